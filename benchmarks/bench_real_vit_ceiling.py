"""The ceiling of additive bit allocation on the real ViT: allocations from *measured* single-unit costs.

Issue 11 asks why LampQ's allocation loses to uniform W4A4 on DINOv2-S/14. This benchmark removes the
metric from the question. For every unit (a layer group: qkv, proj, fc1 or fc2 of a block), it measures
the objective J = mean (1 − class-token cosine) with that unit alone quantized and the rest in float, at
3, 4, 5 and 6 bits. It does so three ways: W and A tied, weights only, and activations only. It also
measures the inputs of each attention matmul alone at those bits: q and k of q·kᵀ, the softmax output and v
of softmax·v. Then the ILP allocates on those measured costs as if they added up, in one row with the
attention matmuls' inputs as activation items of their own. This is the best an additive metric can do, since
Ω_i(b) is the true ΔJ_i(b).

The probes run on 16 images of one of two sets:
- 'calibration': the first 16 calibration crops, the images that a user has;
- 'evaluation': the first 16 evaluation crops, an oracle that knows the held-out domain.

Every allocation is scored on the other 16 evaluation crops, which no probe saw, with the attention
matmul inputs at 4 bits, as in uniform W4A4. The calibration, ranges and GPTQ Hessians come from all 32
calibration crops, as in `quantize_uniform`. The script uses the pipeline's private `_prepare` to get the
exact calibrated quantizers that `quantize` runs on.

    python benchmarks/bench_real_vit_ceiling.py [--budget 4]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_json, write_section  # noqa: E402

from lampq_jax.allocation import Budget, allocate_bits  # noqa: E402
from lampq_jax.apply.calibration import batched_outputs  # noqa: E402
from lampq_jax.apply.dynamic import DynamicBits, DynamicQuantizer, dynamic_apply, dynamic_bits  # noqa: E402
from lampq_jax.apply.static import static_module  # noqa: E402
from lampq_jax.config import LampQConfig  # noqa: E402
from lampq_jax.data.photos import photo_crops  # noqa: E402
from lampq_jax.models.dinov2_onnx import load_dinov2_s14, normalize_imagenet  # noqa: E402

# Private on purpose: the base quantizers exactly as `quantize` prepares them, whose units this benchmark
# probes one by one; no public API hands them out (the issue-15 note lists this).
from lampq_jax.pipeline import _prepare, _prepare_options, _Timer  # noqa: E402

PROBE_BITS = (3, 4, 5, 6)
KINDS = ("tied", "weights", "activations")


def cosines(out: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """[N] cos(out_n, ref_n) of [N, D] class tokens."""
    out = out / np.linalg.norm(out, axis=-1, keepdims=True)
    ref = ref / np.linalg.norm(ref, axis=-1, keepdims=True)
    return (out * ref).sum(-1)


def one_minus_cos(out: np.ndarray, ref: np.ndarray) -> float:
    """mean_n (1 − cos(out_n, ref_n)) over [N, D] class tokens."""
    return float(1.0 - cosines(out, ref).mean())


def probe_pair(kind: str, bits: int) -> tuple[int, int]:
    """(weight bits, activation bits) of a probe; 0 leaves that half in float."""
    return {"tied": (bits, bits), "weights": (bits, 0), "activations": (0, bits)}[kind]


def measured_curves(score, units: dict[str, list[str]], kind: str) -> np.ndarray:
    """[units, len(PROBE_BITS)] J with each unit alone quantized (`kind`), the rest in float."""
    return np.array([[score({p: probe_pair(kind, b) for p in paths}) for b in PROBE_BITS] for paths in units.values()])


MATMULS = ("q·kᵀ", "softmax·v")  # the two attention matmuls, whose inputs are (q, k) and (softmax, v)


def attention_state(act_params, attention: list[str], bits, attention_bits) -> DynamicBits:
    """`DynamicBits` of an assignment whose attentions have two bit-widths {path: (q·kᵀ bits, softmax·v bits)}:
    q and k at the first, v and the softmax output at the second (0: float)."""
    state = dynamic_bits(act_params, attention, bits, {})
    site_bits, softmax_bits = dict(state.site_bits), dict(state.softmax_bits)
    for path, (qk, pv) in attention_bits.items():
        site_bits[f"{path}/q"] = site_bits[f"{path}/k"] = np.int32(qk)
        site_bits[f"{path}/v"] = softmax_bits[path] = np.int32(pv)
    return DynamicBits(state.tables, site_bits, softmax_bits)


def attention_curves(score, attention: list[str]) -> np.ndarray:
    """[2 × attention modules, len(PROBE_BITS)] J with the inputs of one attention matmul alone quantized,
    everything else in float; rows: (module 0, q·kᵀ), (module 0, softmax·v), (module 1, q·kᵀ), ..."""
    pair = {"q·kᵀ": lambda b: (b, 0), "softmax·v": lambda b: (0, b)}
    return np.array([[score({}, {p: pair[m](b)}) for b in PROBE_BITS] for p in attention for m in MATMULS])


def allocations_with_attention(
    curves: dict[str, np.ndarray], num_weights, num_acts, matmul_acts, budget: float
) -> tuple[list[tuple[int, int]], list[int]]:
    """(units' (b_w, b_a), attention matmuls' bits) from one ILP on measured curves, W and A separate, where
    the inputs of each attention matmul are an activation item too: the activation budget is the
    element-weighted mean over the linear layers' inputs and q, k, v and the softmax output.

    matmul_acts: (q·kᵀ input entries, softmax·v input entries) per example of one attention.
    """
    bits = np.array(PROBE_BITS)
    m = len(bits)
    w_index, a_index = (g.ravel() for g in np.meshgrid(np.arange(m), np.arange(m), indexing="ij"))
    units = len(num_weights)
    attention = curves["attention"]
    cost = np.concatenate([curves["weights"][:, w_index] + curves["activations"][:, a_index], attention[:, a_index]])
    allowed = np.ones(cost.shape, bool)
    allowed[units:] = w_index == a_index  # an attention item has no weights: one option per bit-width
    attention_acts = np.tile(np.asarray(matmul_acts), len(attention) // 2)
    choice = allocate_bits(
        cost,
        bits[w_index],
        bits[a_index],
        num_weights=np.concatenate([num_weights, np.zeros(len(attention), int)]),
        num_activations=np.concatenate([num_acts, attention_acts]),
        budget=Budget(avg_bits=budget, avg_act_bits=budget),
        allowed=allowed,
    ).choice
    return (
        [(int(bits[w_index[j]]), int(bits[a_index[j]])) for j in choice[:units]],
        [int(bits[a_index[j]]) for j in choice[units:]],
    )


def allocations(
    curves: dict[str, np.ndarray], num_weights, num_acts, budget: float
) -> dict[str, list[tuple[int, int]]]:
    """{name: [(b_w, b_a) per unit]} from the ILP on measured curves: tied, separate W/A, weights only."""
    bits = np.array(PROBE_BITS)
    m = len(bits)
    tied = allocate_bits(curves["tied"], bits, num_weights=num_weights, budget=Budget(avg_bits=budget)).choice
    w_index, a_index = (g.ravel() for g in np.meshgrid(np.arange(m), np.arange(m), indexing="ij"))
    separate = allocate_bits(
        curves["weights"][:, w_index] + curves["activations"][:, a_index],
        bits[w_index],
        bits[a_index],
        num_weights=num_weights,
        num_activations=num_acts,
        budget=Budget(avg_bits=budget, avg_act_bits=budget),
    ).choice
    weights = allocate_bits(curves["weights"], bits, num_weights=num_weights, budget=Budget(avg_bits=budget)).choice
    return {
        "W/A tied": [(int(bits[j]), int(bits[j])) for j in tied],
        "W and A separate (two average-bit budgets)": [
            (int(bits[w_index[j]]), int(bits[a_index[j]])) for j in separate
        ],
        "weights only (activations at the budget)": [(int(bits[j]), int(budget)) for j in weights],
    }


def mean_bits_cell(by_type: dict[str, list[float]]) -> str:
    """'w/a, w/a, w/a, w/a': the mean weight / input bits of qkv, proj, fc1 and fc2, for a table cell."""
    return ", ".join(f"{w:.2f}/{a:.2f}" for w, a in (by_type[t] for t in ("qkv", "proj", "fc1", "fc2")))


def prepared_dinov2(**options):
    """(model, prepared, `DynamicQuantizer`, calibration crops, evaluation crops, FP apply): DINOv2-S/14 with the
    base quantizers of `quantize()` calibrated on the 32 calibration crops (seed 0), at batch 32.

    options: `LampQConfig` fields of the base quantizers, e.g. equalize_qk=True.
    """
    model, variables = load_dinov2_s14()
    calibration = normalize_imagenet(photo_crops("calibration", 32, 224, seed=0))
    evaluation = normalize_imagenet(photo_crops("evaluation", 32, 224))
    prep = _prepare(
        model,
        variables,
        calibration,
        rules=(),
        timer=_Timer(),
        mesh=None,
        apply_kwargs={"train": False},
        **_prepare_options(LampQConfig(batch_size=32, **options)),
    )
    dq = DynamicQuantizer(
        model, prep.variables, prep.layers, prep.attention, prep.act_params, {"train": False}, hessians=prep.hessians
    )
    fp_apply = jax.jit(lambda x: model.apply(prep.variables, x, train=False))
    return model, prep, dq, calibration, evaluation, fp_apply


def assignment_apply(static_model, prep, dq, bits, attention_bits=None):
    """x ↦ the fake-quantized model's output under {path: (b_w, b_a)} and attentions {path: (q·kᵀ bits,
    softmax·v bits)}; `dynamic_apply` compiles once for every assignment."""
    variables = {**dict(prep.variables), "params": dq.params({p: wb for p, (wb, _) in bits.items()})}
    state = attention_state(prep.act_params, list(prep.attention), bits, attention_bits or {})
    return lambda x: dynamic_apply(variables, state, x, model=static_model, kwargs=(("train", False),))


def attention_matmul_entries(model, allocated) -> tuple[int, int]:
    """(q·kᵀ input entries, softmax·v input entries) per example of one attention: 2 · tokens · width and
    tokens · width + heads · tokens²."""
    query = next(l for l in allocated if l.type == "qkv")
    tokens = query.num_activations // query.weight_shape[0]
    return 2 * query.num_activations, query.num_activations + model.num_heads * tokens**2


def allocation_units(prep):
    """(embed / head at (8, 8) {path: bits}, the allocated layers, units {group: [paths]}, |W| [units],
    activation entries [units]): a unit is a layer group (qkv, proj, fc1 or fc2 of a block)."""
    fixed = {l.path: (8, 8) for l in prep.layers if l.type in ("embed", "head")}
    allocated = [l for l in prep.layers if l.type not in ("embed", "head")]
    units: dict[str, list[str]] = {}
    for layer in allocated:
        units.setdefault(layer.group, []).append(layer.path)
    by_path = {l.path: l for l in allocated}
    num_weights = np.array([sum(by_path[p].num_weights for p in paths) for paths in units.values()])
    num_acts = np.array([sum(by_path[p].num_activations for p in paths) for paths in units.values()])
    return fixed, allocated, units, num_weights, num_acts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=int, default=4)
    args = parser.parse_args()
    start = time.perf_counter()
    model, prep, dq, calibration, evaluation, fp_apply = prepared_dinov2()

    def image_set(images):
        return images, np.asarray(batched_outputs(fp_apply, images, 16))

    probe_sets = {"calibration": image_set(calibration[:16]), "evaluation (oracle)": image_set(evaluation[:16])}
    held_out = image_set(evaluation[16:])

    static_model = static_module(model)

    def score(bits, data, attention=None):
        """1 − cos on `data` with {path: (b_w, b_a)} and attentions {path: (q·kᵀ bits, softmax·v bits)}."""
        images, ref = data
        run = assignment_apply(static_model, prep, dq, bits, attention)
        return one_minus_cos(np.asarray(batched_outputs(run, images, 16)), ref)

    fixed, allocated, units, num_weights, num_acts = allocation_units(prep)
    by_path = {l.path: l for l in allocated}
    attention = {p: (args.budget, args.budget) for p in prep.attention}

    matmul_acts = attention_matmul_entries(model, allocated)

    def evaluate(unit_bits, attention_bits=None):
        attention_bits = attention if attention_bits is None else attention_bits
        bits = {p: pair for paths, pair in zip(units.values(), unit_bits) for p in paths}
        by_type = {}
        for layer in allocated:
            by_type.setdefault(layer.type, []).append(bits[layer.path])
        by_type["attention"] = [(0, b) for pair in attention_bits.values() for b in pair]
        return {
            "held_out": score({**bits, **fixed}, held_out, attention_bits),
            "calibration": score({**bits, **fixed}, probe_sets["calibration"], attention_bits),
            "by_type": {
                t: [float(np.mean([b[0] for b in v])), float(np.mean([b[1] for b in v]))] for t, v in by_type.items()
            },
        }

    rows = [
        {
            "probes": "—",
            "allocation": f"uniform W{args.budget}A{args.budget}",
            **evaluate([(args.budget, args.budget)] * len(units)),
        }
    ]
    sums, all_curves = {}, {}
    for name, data in probe_sets.items():
        curves = {kind: measured_curves(lambda bits: score(bits, data), units, kind) for kind in KINDS}
        curves["attention"] = attention_curves(lambda bits, att: score(bits, data, att), list(prep.attention))
        sums[name] = {kind: float(c[:, PROBE_BITS.index(args.budget)].sum()) for kind, c in curves.items()}
        all_curves[name] = {kind: c.tolist() for kind, c in curves.items()}
        for allocation, unit_bits in allocations(curves, num_weights, num_acts, args.budget).items():
            rows.append({"probes": name, "allocation": allocation, **evaluate(unit_bits)})
            print(rows[-1], flush=True)
        unit_bits, matmul_bits = allocations_with_attention(curves, num_weights, num_acts, matmul_acts, args.budget)
        attention_bits = {p: tuple(matmul_bits[2 * k : 2 * k + 2]) for k, p in enumerate(prep.attention)}
        rows.append(
            {
                "probes": name,
                "allocation": "W and A separate, attention matmul inputs allocated too",
                "attention_bits": attention_bits,
                **evaluate(unit_bits, attention_bits),
            }
        )
        print(rows[-1], flush=True)
    uniform = rows[0]["held_out"]
    lines = [
        "| probes on | allocation | held-out 1 − cos | ratio to uniform | J on calibration crops | "
        "mean bits W/A: qkv, proj, fc1, fc2 | mean attention bits |",
        "|---|---|---:|---:|---:|---|---:|",
    ]
    for r in rows:
        mean_bits = mean_bits_cell(r["by_type"])
        lines.append(
            f"| {r['probes']} | {r['allocation']} | {r['held_out']:.4f} | {r['held_out'] / uniform:.2f} "
            f"| {r['calibration']:.4f} | {mean_bits} | {r['by_type']['attention'][1]:.2f} |"
        )
    sum_lines = [
        f"- probes on {name}: sum over units of ΔJ alone at {args.budget} bits: tied {s['tied']:.4f}, "
        f"weights {s['weights']:.4f}, activations {s['activations']:.4f}, attention inputs {s['attention']:.4f}; "
        "uniform's J on that set: "
        f"{score({**{p: (args.budget, args.budget) for p in by_path}, **fixed}, probe_sets[name], attention):.4f}"
        for name, s in sums.items()
    ]
    total = time.perf_counter() - start
    body = (
        "## Ceiling of additive allocation on the real ViT: ILP on measured single-unit costs (DINOv2-S/14)\n\n"
        f"Each of the 48 units probed alone (rest in float) at {PROBE_BITS} bits, tied / weights only / "
        "activations only, and the inputs of each of the 24 attention matmuls (q and k of q·kᵀ, softmax and v "
        "of softmax·v) alone at the same bits, on 16 crops; the ILP takes those measured ΔJ as Ω (average-bit budget "
        f"{args.budget}, embed/head at 8). Scored on 16 evaluation crops that no probe saw, attention matmul "
        f"inputs at {args.budget} unless allocated. Where they are allocated, the activation budget is the mean "
        "over all activation entries, the linear layers' inputs and q, k, v, softmax together (uniform's is the budget "
        "too). 'evaluation (oracle)' probes on the held-out domain itself.\n\n"
        + "\n".join(lines)
        + "\n\n"
        + "\n".join(sum_lines)
        + f"\n\nWhole run: {total:.0f} s."
    )
    write_section(
        "bench_real_vit_ceiling", body, " ".join(["python benchmarks/bench_real_vit_ceiling.py", *sys.argv[1:]])
    )
    write_json(
        "real_vit_ceiling.json",
        {
            "rows": rows,
            "sums": sums,
            "probe_bits": PROBE_BITS,
            "units": list(units),
            "attention": list(prep.attention),
            "curves": all_curves,
            "seconds": total,
        },
    )


if __name__ == "__main__":
    main()
