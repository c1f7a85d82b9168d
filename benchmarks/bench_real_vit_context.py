"""Interaction-aware allocation on the real ViT: unit costs measured in the quantized model's context.

`bench_real_vit_ceiling.py` showed that costs measured with one unit alone quantized (the rest in float)
add up badly on DINOv2-S/14: even an oracle's additive allocation on them, W/A tied, loses to uniform
W4A4. This benchmark measures each cost where the unit will live: with every other unit at the current
assignment a (uniform W{β}A{β} in round 0),

    Ω_u(b) = J(a with unit u's weights, or its input, or an attention matmul's inputs, at b) − J(a),

for b in 3..6 bits, J = mean (1 − class-token cosine) on 16 calibration crops. The ILP takes those as
costs (W and A separate, the attention matmuls' inputs as activation items; budgets as in the ceiling
benchmark: average weight bits β over |W|, average activation bits β over every activation entry) plus a
trust region λ · (bits moved), for a few λ; the λ whose assignment has the lowest calibration J is the
round's step, and the next round measures the costs again at the new assignment, for `--rounds` rounds or
until no λ improves J. Every assignment is scored on 16 evaluation crops of other photos that no probe saw.
The costs at uniform are cached in benchmarks/results/ (measuring them, 360 runs of the model on 16 crops,
took 749 s on 2 cores beside another benchmark); a last table gives J against the weights' bits alone.

    python benchmarks/bench_real_vit_context.py [--budget 4] [--rounds 2]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_real_vit_ceiling import (  # noqa: E402
    PROBE_BITS,
    allocation_units,
    allocations_with_attention,
    assignment_apply,
    attention_matmul_entries,
    mean_bits_cell,
    one_minus_cos,
    prepared_dinov2,
)
from common import write_json, write_section  # noqa: E402

from lampq_jax.apply.calibration import batched_outputs  # noqa: E402
from lampq_jax.apply.static import static_module  # noqa: E402


def context_costs(score, units, attention, unit_bits, attention_bits) -> dict[str, np.ndarray]:
    """{'weights', 'activations': [units, len(PROBE_BITS)], 'attention': [2 · attentions, len(PROBE_BITS)]}:
    J with one entry moved to each probe bit-width, everything else at the assignment, minus J there."""
    base = score(unit_bits, attention_bits)
    weights, activations = np.zeros([len(units), len(PROBE_BITS)]), np.zeros([len(units), len(PROBE_BITS)])
    for u in range(len(units)):
        for j, b in enumerate(PROBE_BITS):
            w, a = unit_bits[u]
            if b != w:
                weights[u, j] = score(unit_bits[:u] + [(b, a)] + unit_bits[u + 1 :], attention_bits) - base
            if b != a:
                activations[u, j] = score(unit_bits[:u] + [(w, b)] + unit_bits[u + 1 :], attention_bits) - base
    rows = []
    for path in attention:
        for m in range(2):
            row = []
            for b in PROBE_BITS:
                pair = list(attention_bits[path])
                if b == pair[m]:
                    row.append(0.0)
                    continue
                pair[m] = b
                row.append(score(unit_bits, {**attention_bits, path: tuple(pair)}) - base)
            rows.append(row)
    return {"weights": weights, "activations": activations, "attention": np.array(rows)}


RESULTS = Path(__file__).resolve().parent / "results"
WEIGHT_SWEEP = (3, 4, 5, 6, 8, 0)  # weight bits of the sweep table (0: float)
PROXIMAL_FACTORS = (0.01, 0.03, 0.1, 0.3)  # λ of the trust region, as fractions of the largest |Ω|


def proximal_moves(key: str, unit_bits, attention_bits) -> np.ndarray:
    """[rows, len(PROBE_BITS)] |b − current bits| of each cost entry (`context_costs`' layout)."""
    if key == "attention":
        current = [pair[m] for pair in attention_bits.values() for m in range(2)]
    else:
        current = [pair[0 if key == "weights" else 1] for pair in unit_bits]
    return np.abs(np.array(PROBE_BITS)[None, :] - np.array(current)[:, None]).astype(float)


def predicted_change(costs, new_units, new_attention) -> float:
    """Σ of the costs of the chosen bits: the change of J that additive costs predict for an assignment."""
    index = {b: j for j, b in enumerate(PROBE_BITS)}
    units = sum(costs["weights"][u, index[w]] + costs["activations"][u, index[a]] for u, (w, a) in enumerate(new_units))
    matmuls = [b for pair in new_attention.values() for b in pair]
    return float(units + sum(costs["attention"][r, index[b]] for r, b in enumerate(matmuls)))


def moved(unit_bits, attention_bits, new_units, new_attention) -> int:
    """Entries (weights, inputs, attention matmul inputs) whose bits differ between two assignments."""
    units = sum((a[0] != b[0]) + (a[1] != b[1]) for a, b in zip(unit_bits, new_units))
    return int(units + sum((a != b) for p in attention_bits for a, b in zip(attention_bits[p], new_attention[p])))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    start = time.perf_counter()
    model, prep, dq, calibration, evaluation, fp_apply = prepared_dinov2()
    static_model = static_module(model)
    fixed, allocated, units, num_weights, num_acts = allocation_units(prep)
    matmul_acts = attention_matmul_entries(model, allocated)

    def scorer(images):
        ref = np.asarray(batched_outputs(fp_apply, images, 16))

        def score(unit_bits, attention_bits):
            bits = {p: pair for paths, pair in zip(units.values(), unit_bits) for p in paths}
            run = assignment_apply(static_model, prep, dq, {**bits, **fixed}, attention_bits)
            return one_minus_cos(np.asarray(batched_outputs(run, images, 16)), ref)

        return score

    calib_score, held_out_score = scorer(calibration[:16]), scorer(evaluation[16:])
    unit_bits = [(args.budget, args.budget)] * len(units)
    attention_bits = {p: (args.budget, args.budget) for p in prep.attention}

    def record(name, unit_bits, attention_bits, seconds=0.0):
        by_type = {}
        for layer in allocated:
            by_type.setdefault(layer.type, []).append(unit_bits[list(units).index(layer.group)])
        row = {
            "assignment": name,
            "calibration": calib_score(unit_bits, attention_bits),
            "held_out": held_out_score(unit_bits, attention_bits),
            "by_type": {
                t: [float(np.mean([b[0] for b in v])), float(np.mean([b[1] for b in v]))] for t, v in by_type.items()
            },
            "attention": float(np.mean([b for pair in attention_bits.values() for b in pair])),
            "unit_bits": unit_bits,
            "attention_bits": attention_bits,
            "seconds": seconds,
        }
        print({k: v for k, v in row.items() if k not in ("unit_bits", "attention_bits")}, flush=True)
        return row

    rows = [record(f"uniform W{args.budget}A{args.budget}", unit_bits, attention_bits)]
    current_j = rows[0]["calibration"]
    cache = RESULTS / f"real_vit_context_costs_b{args.budget}.npz"
    for k in range(1, args.rounds + 1):
        t0 = time.perf_counter()
        if k == 1 and cache.is_file():  # the costs at uniform, measured by an earlier run of this script
            with np.load(cache) as f:
                costs = {key: f[key] for key in f.files}
        else:
            costs = context_costs(calib_score, units, list(prep.attention), unit_bits, attention_bits)
            if k == 1:
                RESULTS.mkdir(exist_ok=True)
                np.savez(cache, **costs)
        measured = time.perf_counter() - t0
        # A trust region: λ · (bits moved) added to every option's cost, λ from 0 (the plain ILP) upwards;
        # the λ whose assignment has the lowest calibration J is this round's step.
        scale = float(np.abs(np.concatenate([c.ravel() for c in costs.values()])).max())
        candidates = []
        for lam in (0.0, *(scale * f for f in PROXIMAL_FACTORS)):
            penalized = {key: c + lam * proximal_moves(key, unit_bits, attention_bits) for key, c in costs.items()}
            new_units, matmul_bits = allocations_with_attention(
                penalized, num_weights, num_acts, matmul_acts, args.budget
            )
            new_attention = {p: tuple(matmul_bits[2 * i : 2 * i + 2]) for i, p in enumerate(prep.attention)}
            row = record(f"round {k}, λ = {lam:.2g}", new_units, new_attention, measured)
            row["moved"] = moved(unit_bits, attention_bits, new_units, new_attention)
            row["predicted"] = predicted_change(costs, new_units, new_attention)
            candidates.append(row)
        rows += candidates
        step = min(candidates, key=lambda r: r["calibration"])
        if step["calibration"] >= current_j:  # no λ improves on where we are: stop
            break
        unit_bits, attention_bits, current_j = step["unit_bits"], step["attention_bits"], step["calibration"]
    best = min(rows[1:], key=lambda r: r["calibration"])
    uniform = rows[0]["held_out"]
    lines = [
        "| assignment | entries moved | predicted ΔJ | measured ΔJ | calibration J | held-out 1 − cos "
        "| ratio to uniform | mean bits W/A: qkv, proj, fc1, fc2 | mean attention bits |",
        "|---|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for r in rows:
        mean_bits = mean_bits_cell(r["by_type"])
        lines.append(
            f"| {r['assignment']}{' (kept: lowest calibration J)' if r is best else ''} | {r.get('moved', 0)} "
            f"| {r.get('predicted', 0.0):+.4f} | {r['calibration'] - rows[0]['calibration']:+.4f} "
            f"| {r['calibration']:.4f} | {r['held_out']:.4f} | {r['held_out'] / uniform:.2f} | {mean_bits} "
            f"| {r['attention']:.2f} |"
        )
    # How J answers the weights' bits alone, with the inputs at 4 or 8: where it stops being monotone, no cost
    # measured one entry at a time can guide an allocation.
    weight_lines = [
        "| inputs of the linear layers | inputs of the attention matmuls | "
        + " | ".join(f"W{b}" for b in WEIGHT_SWEEP[:-1])
        + " | float weights |",
        "|---|---|" + "---:|" * len(WEIGHT_SWEEP),
    ]
    sweep = {}
    for linear_bits, matmul_bits in ((4, 4), (4, 8), (8, 4), (8, 8)):
        matmuls = {p: (matmul_bits, matmul_bits) for p in prep.attention}
        values = [calib_score([(b, linear_bits)] * len(units), matmuls) for b in WEIGHT_SWEEP]
        sweep[f"A{linear_bits}/attention {matmul_bits}"] = values
        weight_lines.append(f"| {linear_bits} | {matmul_bits} | " + " | ".join(f"{v:.4f}" for v in values) + " |")
    total = time.perf_counter() - start
    body = (
        "## Interaction-aware allocation on the real ViT: costs measured in context (DINOv2-S/14)\n\n"
        f"Each round measures J (1 − class-token cosine, 16 calibration crops) with one entry moved to each of "
        f"{PROBE_BITS} bits and everything else at the current assignment (round 1: uniform W{args.budget}A"
        f"{args.budget}): the weights or the input of each of the 48 units, or the inputs of each of the 24 "
        "attention matmuls. The ILP (W and A separate, attention matmul inputs as activation items; average "
        f"weight bits ≤ {args.budget} over |W|, average activation bits ≤ {args.budget} over every activation "
        "entry; embed/head at 8) allocates on those costs plus a trust region λ · (bits moved from the current "
        f"assignment), λ = 0 and {PROXIMAL_FACTORS} × the largest |cost|; the λ with the lowest calibration J "
        "is the round's step, and the search stops when no λ improves on the current J. Scored on 16 "
        "evaluation crops that no probe saw; 'entries moved' counts the weight, input and attention-input bits "
        "that differ from the round's starting point; 'predicted ΔJ' is the sum of their measured costs, "
        "'measured ΔJ' the calibration J's change from uniform.\n\n"
        + "\n".join(lines)
        + "\n\nJ on the 16 calibration crops with every allocated layer's weights at one bit-width (0: float), "
        "the inputs fixed:\n\n" + "\n".join(weight_lines) + f"\n\nWhole run: {total:.0f} s."
    )
    write_section(
        "bench_real_vit_context", body, " ".join(["python benchmarks/bench_real_vit_context.py", *sys.argv[1:]])
    )
    write_json("real_vit_context.json", {"rows": rows, "units": list(units), "weight_sweep": sweep, "seconds": total})


if __name__ == "__main__":
    main()
