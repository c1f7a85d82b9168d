"""A model the built-in rules do not know (invented names, attention by hand): user rules all the way through."""

import warnings

import jax
import numpy as np
import pytest

import lampq_jax
from invented_vit import RULES, InventedBackbone
from lampq_jax import LampQConfig
from lampq_jax.layers import NO_ATTENTION_LINE
from lampq_jax.report import report_markdown

FAST = dict(progress=False, iterations=0, probes=1, output="features")
ALLOCATED = ("qkv", "proj", "fc1", "fc2")


@pytest.fixture(scope="module")
def invented():
    model = InventedBackbone()
    images = np.asarray(jax.random.normal(jax.random.key(1), (4, 16, 16, 3)), np.float32)
    return model, model.init(jax.random.key(0), images[:1]), images


@pytest.fixture(scope="module")
def ruled_result(invented):
    model, variables, images = invented
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the rules type every layer: no "match no type rule" warning
        return lampq_jax.quantize(model, variables, images, budget=4.0, rules=RULES, config=LampQConfig(**FAST))


def test_user_rules_type_every_layer_and_keep_embed_at_fixed_bits(ruled_result):
    r = ruled_result
    types = {l.path: l.type for l in r.quantized.layers}
    assert types["patch_embed"] == "embed"
    for i in range(2):
        assert [types[f"layer_{i}/{n}"] for n in ("query", "key", "value", "attn_out", "fc1", "fc2")] == [
            "qkv",
            "qkv",
            "qkv",
            "proj",
            "fc1",
            "fc2",
        ]
        assert r.bits[f"layer_{i}/query"] == r.bits[f"layer_{i}/key"] == r.bits[f"layer_{i}/value"]
    assert r.bits["patch_embed"] == (8, 8)
    assert sorted(r.report["alpha"]) == sorted(ALLOCATED)
    assert r.report["objective"] == "cosine"
    assert r.report["avg_weight_bits_allocated"] <= 4.0 + 1e-9
    assert r.rules == tuple(RULES)


def test_report_names_types_embed_bits_and_missing_attention(ruled_result):
    coverage = ruled_result.report["coverage"]
    assert list(coverage["layers_by_type"]) == [*ALLOCATED, "embed"]
    assert coverage["other_layers"] == [] and coverage["attention_sites"] == []
    text = report_markdown(ruled_result)
    assert "| embed | 1 | 768 | 8 | 8 |" in text
    assert NO_ATTENTION_LINE in text
    assert "layers by type: qkv 6, proj 2, fc1 2, fc2 2, embed 1 (13 layers)" in text
    assert "layers left as 'other': none" in text and "user rules" in text


def test_saved_result_records_rules_and_reloads_without_them(tmp_path, invented, ruled_result):
    model, _, images = invented
    loaded = lampq_jax.load_result(ruled_result.save(tmp_path / "run"), model)
    assert loaded.rules == ruled_result.rules
    assert {l.path: l.type for l in loaded.quantized.layers} == {l.path: l.type for l in ruled_result.quantized.layers}
    np.testing.assert_array_equal(loaded.apply(images), ruled_result.apply(images))


def test_without_rules_all_other_and_the_warning_advice_works(invented):
    model, variables, images = invented
    with pytest.warns(UserWarning, match=r"13 layer\(s\) match no type rule.*pass rules=.*--type-rule"):
        plain = lampq_jax.quantize_uniform(model, variables, images[:4], 4)
    assert {l.type for l in plain.quantized.layers} == {"other"}
    assert plain.bits["patch_embed"] == (4, 4)
    assert len(plain.report["coverage"]["other_layers"]) == 13
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ruled = lampq_jax.quantize_uniform(model, variables, images[:4], 4, rules=RULES)
    assert ruled.bits["patch_embed"] == (8, 8) and ruled.bits["layer_0/fc1"] == (4, 4)
    assert ruled.rules == tuple(RULES)


def test_random_and_metric_check_take_rules(invented):
    model, variables, images = invented
    config = LampQConfig(**FAST)
    random = lampq_jax.quantize_random(model, variables, images[:4], budget=3.0, seed=1, rules=RULES, config=config)
    assert random.bits["patch_embed"] == (8, 8) and random.rules == tuple(RULES)
    assert {l["type"] for l in random.report["layers"]} == set(ALLOCATED)
    figures = lampq_jax.metric_check(model, variables, images[:4], rules=RULES, config=config)
    assert set(figures) == {"none", "mean", "probe"} and all(-1.0 <= v <= 1.0 for v in figures.values())


@pytest.mark.parametrize("entry", ["quantize", "quantize_uniform", "metric_check", "quantize_random"])
def test_rules_are_checked_before_any_work(entry):
    fn = getattr(lampq_jax, entry)
    args = (None, None, None, 4) if entry == "quantize_uniform" else (None, None, None)
    kwargs = {"budget": 4.0} if entry in ("quantize", "quantize_random") else {}
    with pytest.raises(ValueError, match=r"bad regex '\(' in type rule"):
        fn(*args, rules=[("(", "qkv")], **kwargs)
    with pytest.raises(ValueError, match="unknown layer type 'mlp'"):
        fn(*args, rules=[("fc1$", "mlp")], **kwargs)
    with pytest.raises(ValueError, match="the string 'fc1'"):
        fn(*args, rules="fc1", **kwargs)
