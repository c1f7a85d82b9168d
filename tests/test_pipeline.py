import dataclasses
import json
import os

import numpy as np
import pytest

import lampq_jax
import lampq_jax.pipeline
from lampq_jax import LampQConfig
from lampq_jax.apply.dynamic import DynamicQuantizer
from lampq_jax.report import report_markdown
from lampq_jax.sensitivity.objective import resolve_objective


FAST = dict(progress=False, iterations=1, probes=2)


@pytest.fixture(scope="module")
def lampq_result(tiny_setup):
    model, variables, images = tiny_setup
    return lampq_jax.quantize(model, variables, images, budget=4.0, config=LampQConfig(**FAST, metric_check=True))


def allocated_avg(result):
    rows = [l for l in result.quantized.layers if l.type not in ("embed", "head")]
    return sum(l.num_weights * result.bits[l.path][0] for l in rows) / sum(l.num_weights for l in rows)


def test_lampq_meets_budget_and_reports(lampq_result):
    r = lampq_result
    assert allocated_avg(r) <= 4.0 + 1e-9
    assert r.report["avg_weight_bits_allocated"] == pytest.approx(allocated_avg(r))
    assert r.bits["embedding"] == (8, 8) and r.bits["output_projection"] == (8, 8)
    for block in range(2):
        attn = f"Transformer/encoderblock_{block}/MultiHeadDotProductAttention_0"
        assert r.bits[f"{attn}/query"] == r.bits[f"{attn}/key"] == r.bits[f"{attn}/value"]
    assert set(r.report["spearman"]) == {"none", "mean", "probe"}
    assert r.report["probe_bits"] == 3  # one candidate below the budget of 4
    assert set(r.report["alpha"]) == {"qkv", "proj", "fc1", "fc2"}
    assert r.report["history"][0]["ilp_status"] == "optimal"
    assert len(r.report["layers"]) == 12 and set(r.report["layers"][0]["omega"]) == {"2", "3", "4", "5", "6", "8"}
    assert {"discovery", "calibration", "fisher", "metric", "probe", "ilp"} <= set(r.timings)
    assert r.report["model_bytes"] < r.report["fp32_bytes"]
    coverage = r.report["coverage"]
    assert coverage["other_layers"] == [] and coverage["type_rules"] == []
    assert coverage["attention_sites"] == [
        f"Transformer/encoderblock_{b}/MultiHeadDotProductAttention_0/{s}"
        for b in range(2)
        for s in ("q", "k", "v", "softmax")
    ]
    text = report_markdown(r)
    assert "attention matmuls quantized at 8 sites" in text and "not quantized" not in text
    assert "| embed | 1 | 1,568 | 8 | 8 |" in text and "| head | 1 |" in text


def test_keep_uniform_returns_the_best_measured_assignment(tiny_setup, lampq_result):
    """The uniform assignment at the budget is measured beside the rounds; the result is the lowest J of all."""
    model, variables, images = tiny_setup
    history = lampq_result.report["history"]
    uniform = {p: [4, 4] for p in history[0]["bits"]}
    assert sum(h["bits"] == uniform or {k: list(v) for k, v in h["bits"].items()} == uniform for h in history) == 1
    assert lampq_result.report["J"] == min(h["J"] for h in history)
    (best,) = [h for h in history if h["round"] == lampq_result.report["best_round"]]
    assert all(lampq_result.bits[p] == tuple(b) for p, b in best["bits"].items())
    own = lampq_jax.quantize(model, variables, images, budget=4.0, config=LampQConfig(**FAST, keep_uniform=False))
    assert all(h["round"] != "uniform" for h in own.report["history"])
    assert lampq_result.report["J"] <= own.report["J"]
    assert [h["J"] for h in own.report["history"]] == [h["J"] for h in history if h["round"] != "uniform"]


def test_same_seed_same_result(tiny_setup, lampq_result):
    model, variables, images = tiny_setup
    again = lampq_jax.quantize(model, variables, images, budget=4.0, config=LampQConfig(**FAST))
    assert again.bits == lampq_result.bits
    np.testing.assert_array_equal(again.apply(images), lampq_result.apply(images))


def test_save_and_reload_identical(tmp_path, tiny_setup, lampq_result):
    _, _, images = tiny_setup
    folder = lampq_result.save(tmp_path / "run")
    assert sorted(os.listdir(folder)) == ["allocation.json", "arrays.npz", "report.json"]
    loaded = lampq_jax.load_result(folder)
    assert loaded.bits == lampq_result.bits and loaded.method == "lampq"
    np.testing.assert_array_equal(loaded.apply(images), lampq_result.apply(images))
    for path, tensor in lampq_result.quantized.weights.items():  # the codes, not only the values, come back
        np.testing.assert_array_equal(loaded.quantized.weights[path].packed, tensor.packed)
    with np.load(folder / "arrays.npz") as npz:  # kernels are stored as packed codes, not as floats
        assert not any(
            k.endswith("/kernel") and k[len("variables/params/") : -len("/kernel")] in loaded.bits for k in npz
        )
    with pytest.raises(FileExistsError, match="overwrite=True"):
        lampq_result.save(folder)
    allocation = json.loads((folder / "allocation.json").read_text())
    (folder / "allocation.json").write_text(json.dumps({**allocation, "format": 1}))
    with pytest.raises(ValueError, match="result format 1, this lampq_jax reads format 2.*quantize again"):
        lampq_jax.load_result(folder)


def test_corrupted_saved_result_named(tmp_path, lampq_result):
    folder = lampq_result.save(tmp_path / "run")
    (folder / "allocation.json").write_text('{"format": 1, "bits": ')
    with pytest.raises(ValueError, match=r"allocation.json is not valid JSON .*is not a valid saved result"):
        lampq_jax.load_result(folder)
    (folder / "allocation.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="allocation.json holds a list, not an object"):
        lampq_jax.load_result(folder)


def test_failed_save_leaves_nothing(tmp_path, monkeypatch, lampq_result):
    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", broken)
    with pytest.raises(OSError, match="disk full"):
        lampq_result.save(tmp_path / "run")
    assert os.listdir(tmp_path) == []


def test_infeasible_budget_states_smallest(tiny_setup):
    model, variables, images = tiny_setup
    with pytest.raises(ValueError, match="smallest feasible average is 2.0 bits"):
        lampq_jax.quantize(
            model,
            variables,
            images[:4],
            budget=1.5,
            config=LampQConfig(progress=False, iterations=0, metric_check=False, alpha="none"),
        )


def test_bad_calibration_data(tiny_setup):
    model, variables, images = tiny_setup
    bad = np.array(images)
    bad[0, 0, 0, 0] = np.inf
    with pytest.raises(ValueError, match="NaN/Inf"):
        lampq_jax.quantize(model, variables, bad, budget=4.0)
    with pytest.raises(ValueError, match="empty"):
        lampq_jax.quantize(model, variables, images[:0], budget=4.0)


@pytest.mark.parametrize(
    "labels, message",
    [
        (np.array([0, 1, 10, -1]), r"in \[0, 10\) of the model's 10 logits; 2 of 4 are outside, e.g. \[-1, 10\]"),
        (np.array([0.0, 1.0, 2.0, 3.0]), "integer class indices, got dtype float64"),
        (np.array([0, 1, 2]), r"labels must have shape \(4,\), got \(3,\)"),
    ],
)
def test_bad_labels_fail_before_the_ilp(tiny_setup, labels, message):
    model, variables, images = tiny_setup
    with pytest.raises(ValueError, match=message):
        lampq_jax.quantize(
            model,
            variables,
            images[:4],
            budget=4.0,
            labels=labels,
            config=LampQConfig(progress=False, iterations=0, metric_check=False, alpha="none"),
        )


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(fixed_bits=9), r"fixed_bits must be an integer in \[2, 8\], got 9"),
        (dict(attn_bits=1), r"attn_bits must be an integer in \[2, 8\], got 1"),
        (dict(candidates=(3, 4.5)), r"every candidate of \(3, 4.5\) must be an integer in \[2, 8\].*got 4.5"),
        (dict(fixed_layers=(("a/b", 12),)), r"fixed_layers entry \('a/b', 12\) must be an integer in \[2, 8\], got 12"),
        (dict(min_bits=(("fc2", 0),)), r"min_bits entry \('fc2', 0\) must be an integer in \[2, 8\], got 0"),
    ],
)
def test_bits_out_of_range_name_the_option(options, message):
    with pytest.raises(ValueError, match=message):
        LampQConfig(**options)


def test_module_granularity_fixed_layers_and_bops(tiny_setup):
    model, variables, images = tiny_setup
    fixed = "Transformer/encoderblock_0/MlpBlock_0/Dense_1"
    config = LampQConfig(
        progress=False,
        iterations=0,
        metric_check=False,
        alpha="mean",
        granularity="module",
        budget_kind="bops",
        fixed_layers=((fixed, 8),),
    )
    r = lampq_jax.quantize(model, variables, images[:8], budget=5.0, config=config)
    mlp = [r.bits[f"Transformer/encoderblock_1/MlpBlock_0/Dense_{i}"] for i in range(2)]
    assert mlp[0] == mlp[1]
    assert r.bits[fixed] == (8, 8) and r.bits["Transformer/encoderblock_0/MlpBlock_0/Dense_0"] == (8, 8)
    allocated = [l for l in r.quantized.layers if l.type not in ("embed", "head")]
    bops = sum(l.macs * r.bits[l.path][0] * r.bits[l.path][1] for l in allocated)
    assert bops <= 25 * sum(l.macs for l in allocated) * (1 + 1e-9)
    with pytest.raises(ValueError, match="no/such"):
        lampq_jax.quantize(
            model, variables, images[:8], budget=4.0, config=LampQConfig(progress=False, fixed_layers=(("no/such", 4),))
        )


def test_metric_check_and_history(tiny_setup, lampq_result):
    model, variables, images = tiny_setup
    config = LampQConfig(progress=False, probes=2, probe_bits=3)  # the result's probe bits at its budget of 4
    figures = lampq_jax.metric_check(model, variables, images, config=config)
    assert set(figures) == {"none", "mean", "probe"} and all(-1.0 <= r <= 1.0 for r in figures.values())
    assert figures == pytest.approx(lampq_result.report["spearman"])  # same seed, same stages
    first = lampq_result.report["history"][0]
    assert set(first["omega"]) == set(first["bits"]) and len(next(iter(first["omega"].values()))) == 6


def test_alpha_layer_scales_each_unit_by_its_probe(tiny_setup):
    model, variables, images = tiny_setup
    config = LampQConfig(progress=False, iterations=0, metric_check=False, alpha="layer", probe_bits=3)
    r = lampq_jax.quantize(model, variables, images[:8], budget=4.0, config=config)
    rows = r.report["layers"]
    groups = {row["group"] for row in rows}
    assert set(r.report["probes"]) == groups  # every unit probed, not P per type
    for row in rows:  # Ω at the probe bits is the measured increase (or its floor) of the layer's unit
        probe = r.report["probes"][row["group"]]
        unit_omega = sum(o["omega"]["3"] for o in rows if o["group"] == row["group"])
        assert unit_omega >= probe * (1 - 1e-6)
        if probe > 0.2 * unit_omega:
            assert unit_omega == pytest.approx(probe, rel=1e-6)
    assert len({row["alpha"] for row in rows if row["type"] == "fc2"}) > 1  # per unit, not per type


def test_holdout_measures_j_on_images_the_calibration_did_not_see(tiny_setup):
    """With holdout h, ranges / GPTQ come from the fitted images alone, and J is the kept model's on the others."""
    model, variables, images = tiny_setup
    config = LampQConfig(**FAST, holdout=0.25)
    result = lampq_jax.quantize(model, variables, images, budget=4.0, config=config)
    fit, held = lampq_jax.pipeline.holdout_split(16, 0.25, config.seed)
    assert result.report["J_images"] == {"fit": 12, "J": 4}
    assert "(round " in report_markdown(result) and "on 4 held-out images, fitted on 12" in report_markdown(result)
    assert len(set(fit) | set(held)) == 16 and not set(fit) & set(held)
    uniform_fit = lampq_jax.quantize_uniform(model, variables, images[fit], 4)
    for site, params in uniform_fit.quantized.act_params.items():
        np.testing.assert_array_equal(result.quantized.act_params[site], params)
    kl = resolve_objective("kl", labels_given=False, output="logits")
    fp = model.apply(variables, images[held])
    assert result.report["J"] == pytest.approx(float(kl(result.apply(images[held]), fp, None) - kl(fp, fp, None)), 1e-4)


@pytest.mark.parametrize(
    "holdout, message",
    [(1.0, r"holdout must be a fraction in \[0, 1\), got 1.0"), (0.01, "holdout=0.01 of 16 calibration images")],
)
def test_bad_holdout_is_named(tiny_setup, holdout, message):
    model, variables, images = tiny_setup
    with pytest.raises(ValueError, match=message):
        lampq_jax.quantize(model, variables, images, budget=4.0, config=LampQConfig(**FAST, holdout=holdout))


@pytest.mark.parametrize("baseline", ["hawq", "random"])
def test_peer_baselines_calibrate_on_every_image(tiny_setup, baseline):
    """hawq / vtptq / random choose nothing by J, so no image is held out of their calibration, even when the
    base config holds some out."""
    model, variables, images = tiny_setup
    base = LampQConfig(**FAST, holdout=0.25)
    config = lampq_jax.baseline_config("hawq", base) if baseline == "hawq" else base
    if baseline == "hawq":
        result = lampq_jax.quantize(model, variables, images, budget=4.0, config=config)
    else:
        result = lampq_jax.quantize_random(model, variables, images, budget=4.0, config=config)
    assert result.report["J_images"] == {"fit": 16, "J": 16}
    uniform = lampq_jax.quantize_uniform(model, variables, images, 4)
    for site, params in uniform.quantized.act_params.items():
        np.testing.assert_array_equal(result.quantized.act_params[site], params)


def test_j_runs_in_batches_and_comes_from_the_next_fisher_pass_or_the_last_round(tiny_setup, monkeypatch):
    """J's forwards take `batch_size` images a batch; round 0's J comes from round 1's Fisher pass (same point, same
    images) with no forward of its own, and equals the J that a forward measures; a round whose bits repeat the last
    round's reuses its J."""
    model, variables, images = tiny_setup
    fisher_traces, passes = lampq_jax.pipeline.fisher_traces, []

    def float_traces(*args, **kwargs):  # every round sees the float pass's traces (its own outputs): the bits repeat
        traces = fisher_traces(*args, **kwargs)
        passes.append(traces if not passes else dataclasses.replace(passes[0], outputs=traces.outputs))
        return passes[-1]

    apply_skipping, batches, whole_model = DynamicQuantizer.apply_skipping, [], []

    def recording(self, x, bits, attention_bits, skips, cached):
        batches.append(x.shape[0])
        whole_model.append(len(bits) == len(self.layers))
        return apply_skipping(self, x, bits, attention_bits, skips, cached)

    monkeypatch.setattr(lampq_jax.pipeline, "fisher_traces", float_traces)
    monkeypatch.setattr(DynamicQuantizer, "apply_skipping", recording)
    config = LampQConfig(progress=False, probes=2, iterations=3, batch_size=4)
    history = lampq_jax.quantize(model, variables, images, budget=4.0, config=config).report["history"]
    rounds = [h for h in history if h["round"] != "uniform"]
    assert [h["round"] for h in rounds] == [0, 1] and len(passes) == 2
    assert rounds[1]["bits"] == rounds[0]["bits"] and rounds[1]["J"] == rounds[0]["J"]
    assert set(batches) == {4}  # 16 images, 4 a batch
    assert sum(whole_model) == 4 * (len(history) - 2)  # the uniform fallback only: no forward for round 0 or 1
    whole_model.clear()
    no_rounds = dataclasses.replace(config, iterations=0)
    alone = lampq_jax.quantize(model, variables, images, budget=4.0, config=no_rounds).report["history"]
    assert alone[0]["bits"] == rounds[0]["bits"] and sum(whole_model) >= 4  # here J(round 0) is a forward
    np.testing.assert_allclose(rounds[0]["J"], alone[0]["J"], rtol=1e-4)


def test_the_float_fisher_pass_and_the_rounds_passes_compile_once(tiny_setup):
    """The float pass and the rounds' passes draw their targets the same way (in the pass): one compilation."""
    from lampq_jax.apply import compiled
    from lampq_jax.sensitivity.fisher import _fisher_pass

    model, variables, images = tiny_setup
    compiled.clear()
    config = LampQConfig(progress=False, probes=2, iterations=2, batch_size=4)
    result = lampq_jax.quantize(model, variables, images, budget=3.0, config=config)
    assert len([h for h in result.report["history"] if h["round"] != "uniform"]) >= 2  # at least one round's pass
    passes = [fn for key, fn in compiled._table.items() if key[0] is _fisher_pass]
    assert len(passes) == 1 and passes[0]._cache_size() == 1
