"""The most any per-type α can do for LampQ's metric check on the real ViT: DINOv2-S/14, 3 calibration draws.

LampQ's metric check (`metric_check=True`, METHOD.md §4) ranks the 48 units (qkv, proj, fc1, fc2 of 12 blocks)
by Ω_k = α_t(k) · ΔL̂_k at the probe bits and measures each unit's ΔJ alone at those bits, on the same 32
calibration crops; the goal is a Spearman ≥ 0.9 for the default α. A per-type α scales every unit of a type
alike, so it can move units of one type past those of another but cannot reorder units within a type. This
benchmark runs the check (budget 4, so the probes are at 3 bits; `iterations=0`, `keep_uniform=False`: only the
sensitivity is used) and ranks the units with:

- α = none, α = probe: the check's own figures (α = probe from P = 4 units per type);
- best α per type: α_t = Σ ΔJ / Σ ΔL̂ over every unit of type t (what the probes estimate, with all 12 units);
- any α per type: the largest Spearman over a grid of α's (log α_t − log α_fc1 in [−4, 4], steps of 0.1);
- within each type: Spearman of ΔL̂ against ΔJ over that type's 12 units, which no α changes.

    python benchmarks/bench_real_vit_alpha_ceiling.py [--draws 3] [--num-calib 32]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_json, write_section  # noqa: E402

import lampq_jax  # noqa: E402
from lampq_jax.data.photos import photo_crops  # noqa: E402
from lampq_jax.models.dinov2_onnx import load_dinov2_s14, normalize_imagenet  # noqa: E402
from lampq_jax.sensitivity.metric import spearman  # noqa: E402

TYPES = ("qkv", "proj", "fc1", "fc2")
LOG_ALPHA_GRID = np.arange(-4.0, 4.0 + 1e-9, 0.1)


def units_of(report: dict) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """(unit keys, types [U], predicted ΔL̂ at the probe bits [U] (α divided out), measured ΔJ [U]) of a
    metric-checked LampQ report."""
    bits = str(report["probe_bits"])
    keys, types, predicted = [], [], {}
    for row in report["layers"]:
        key = row["group"]
        if key not in predicted:
            keys.append(key)
            types.append(row["type"])
            predicted[key] = 0.0
        predicted[key] += row["omega"][bits] / row["alpha"]
    measured = np.array([report["probes"][k] for k in keys])
    return keys, np.array(types), np.array([predicted[k] for k in keys]), measured


def ranks(values: np.ndarray) -> np.ndarray:
    """Ranks along the last axis (0-based; the values here have no ties)."""
    return np.argsort(np.argsort(values, axis=-1), axis=-1).astype(np.float64)


def best_spearman_over_alpha(types: np.ndarray, predicted: np.ndarray, measured: np.ndarray) -> tuple[float, dict]:
    """(largest Spearman of α_t · predicted against measured, its α_t / α_fc1) over `LOG_ALPHA_GRID` for the
    types other than fc1."""
    others = [t for t in TYPES if t != "fc1"]
    grids = np.stack(np.meshgrid(*[LOG_ALPHA_GRID] * len(others), indexing="ij"), -1).reshape(-1, len(others))
    target = ranks(measured) - ranks(measured).mean()
    log_predicted = np.log(np.maximum(predicted, 1e-30))
    best, best_row = -2.0, None
    for start in range(0, len(grids), 20000):
        grid = grids[start : start + 20000]
        shift = np.zeros((len(grid), len(predicted)))
        for j, t in enumerate(others):
            shift[:, types == t] = grid[:, j : j + 1]
        r = ranks(log_predicted[None] + shift)
        r -= r.mean(axis=1, keepdims=True)
        rho = (r @ target) / (np.linalg.norm(r, axis=1) * np.linalg.norm(target))
        j = int(np.argmax(rho))
        if rho[j] > best:
            best, best_row = float(rho[j]), grid[j]
    return best, {t: float(np.exp(v)) for t, v in zip(others, best_row)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", type=int, default=3)
    parser.add_argument("--num-calib", type=int, default=32, help="calibration crops per draw")
    args = parser.parse_args()
    section = "bench_real_vit_alpha_ceiling" + ("" if args.num_calib == 32 else f"_calib{args.num_calib}")
    json_name = f"{section.removeprefix('bench_')}.json"
    start = time.perf_counter()
    model, variables = load_dinov2_s14()
    rows = []
    for draw in range(args.draws):
        calib = normalize_imagenet(photo_crops("calibration", args.num_calib, 224, seed=draw))
        config = lampq_jax.LampQConfig(
            output="features", metric_check=True, iterations=0, keep_uniform=False, progress=False, seed=draw
        )
        result = lampq_jax.quantize(model, variables, calib, budget=4.0, objective="cosine", config=config, train=False)
        keys, types, predicted, measured = units_of(result.report)
        fitted = {t: measured[types == t].sum() / predicted[types == t].sum() for t in TYPES}
        best_any, best_alpha = best_spearman_over_alpha(types, predicted, measured)
        rows.append(
            {
                "draw": draw,
                "probe_bits": result.report["probe_bits"],
                "none": result.report["spearman"]["none"],
                "probe": result.report["spearman"]["probe"],
                "best_per_type": spearman(predicted * np.array([fitted[t] for t in types]), measured),
                "any_per_type": best_any,
                "any_per_type_alpha_over_fc1": best_alpha,
                "within_type": {t: spearman(predicted[types == t], measured[types == t]) for t in TYPES},
                "units": keys,
                "types": types.tolist(),
                "predicted": predicted.tolist(),
                "measured": measured.tolist(),
            }
        )
        print({k: v for k, v in rows[-1].items() if k not in ("units", "types", "predicted", "measured")}, flush=True)

    def cell(values) -> str:
        return f"{np.mean(values):.3f} ± {np.std(values):.3f}"

    columns = ("none", "probe", "best_per_type", "any_per_type")
    lines = [
        "| draw | α = none | α = probe (LampQ) | best α per type | any α per type | within qkv | within proj "
        "| within fc1 | within fc2 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['draw']} | "
            + " | ".join(f"{r[c]:.3f}" for c in columns)
            + " | "
            + " | ".join(f"{r['within_type'][t]:.2f}" for t in TYPES)
            + " |"
        )
    lines.append(
        "| mean ± std | "
        + " | ".join(cell([r[c] for r in rows]) for c in columns)
        + " | "
        + " | ".join(cell([r["within_type"][t] for r in rows]) for t in TYPES)
        + " |"
    )
    heading = (
        "## The most a per-type α can do for the metric check on the real ViT (DINOv2-S/14)\n\n"
        f"LampQ's own metric check (`metric_check=True`, budget 4, probes at 3 bits, {args.num_calib} calibration crops "
        "per draw): "
        "Spearman over the 48 units of Ω = α_t · ΔL̂ against each unit's measured ΔJ alone. 'best α per type': "
        "α_t = Σ ΔJ / Σ ΔL̂ over all 12 units of the type; 'any α per type': the largest Spearman over a grid of "
        "α's (log-ratios to fc1's in [−4, 4], steps of 0.1). 'within': Spearman of ΔL̂ against ΔJ over one type's "
        f"12 units, which no per-type α changes. The per-unit figures are in `results/{json_name}`.\n\n"
    )
    total = time.perf_counter() - start
    command = (
        "python benchmarks/bench_real_vit_alpha_ceiling.py"
        + ("" if args.draws == 3 else f" --draws {args.draws}")
        + ("" if args.num_calib == 32 else f" --num-calib {args.num_calib}")
    )
    write_section(section, heading + "\n".join(lines) + f"\n\nWhole run: {total:.0f} s.", command)
    write_json(json_name, {"rows": rows, "seconds": total})


if __name__ == "__main__":
    main()
