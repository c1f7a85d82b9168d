"""Uniform WbAb on DINOv2-S/14 against the number of calibration crops, for each range method of the sites.

Each draw takes the 32 calibration crops of `bench_real_vit_lampq.py` (`photo_crops('calibration', 32, 224,
seed=draw)`) and calibrates on a seeded subset of n of them (n = 8, 16, 24, 32; the subsets of one draw are
nested). Every run is scored on the same 32 held-out evaluation crops: 1 − cosine of the class token.
Variants of the base quantizers: the defaults (q·kᵀ inputs and the image min-max, the rest MSE),
`qk_calibration='same'` (q·kᵀ inputs MSE too), and that with `minmax_types=()` (the image MSE too). A range
method whose error grows with n fits the extremes of the crops, not their bulk.

    python benchmarks/bench_real_vit_calib_size.py [--bits 4] [--draws 3] [--sizes 8 16 24 32]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_real_vit_lampq import dinov2_and_evaluation, one_minus_cos  # noqa: E402
from common import write_json, write_section  # noqa: E402

import lampq_jax  # noqa: E402
from lampq_jax.data.photos import photo_crops  # noqa: E402
from lampq_jax.models.dinov2_onnx import normalize_imagenet  # noqa: E402

VARIANTS = {
    "defaults": {},
    "qk_mse": {"qk_calibration": "same"},
    "qk_mse_image_mse": {"qk_calibration": "same", "minmax_types": ()},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=int, nargs="+", default=[4])
    parser.add_argument("--draws", type=int, default=3)
    parser.add_argument("--sizes", type=int, nargs="+", default=[8, 16, 24, 32])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args = parser.parse_args()
    start_all = time.perf_counter()
    model, variables, _, evaluation, ref = dinov2_and_evaluation()
    rows = []
    for draw in range(args.draws):
        crops = normalize_imagenet(photo_crops("calibration", 32, 224, seed=draw))
        order = np.random.default_rng(draw).permutation(len(crops))
        for bits in args.bits:
            for variant in args.variants:
                for size in args.sizes:
                    subset = crops[np.sort(order[:size])]
                    start = time.perf_counter()
                    result = lampq_jax.quantize_uniform(
                        model, variables, subset, bits, train=False, **VARIANTS[variant]
                    )
                    fn = jax.jit(lambda x, r=result: r.apply(x, train=False))
                    row = {
                        "draw": draw,
                        "bits": bits,
                        "variant": variant,
                        "size": size,
                        "eval_1mcos": one_minus_cos(fn, evaluation, ref),
                        "seconds": time.perf_counter() - start,
                    }
                    rows.append(row)
                    print(row, flush=True)
                    write_json("real_vit_calib_size.json", {"rows": rows, "complete": False})

    def cell(bits, variant, size):
        values = [r["eval_1mcos"] for r in rows if (r["bits"], r["variant"], r["size"]) == (bits, variant, size)]
        full = [r["eval_1mcos"] for r in rows if (r["bits"], r["variant"], r["size"]) == (bits, "defaults", 32)]
        ratio = np.asarray(values) / np.asarray(full)
        return f"{np.mean(values):.4f} ± {np.std(values):.4f} ({np.mean(ratio):.2f} ± {np.std(ratio):.2f})"

    lines = [
        "| bits | variant | " + " | ".join(f"{n} crops" for n in args.sizes) + " |",
        "|---|---|" + "---:|" * len(args.sizes),
    ]
    for bits in args.bits:
        for variant in args.variants:
            lines.append(f"| {bits} | {variant} | " + " | ".join(cell(bits, variant, n) for n in args.sizes) + " |")
    total = time.perf_counter() - start_all
    body = (
        "## Real-ViT calibration size: uniform WbAb against the number of calibration crops (DINOv2-S/14)\n\n"
        f"{args.draws} draws of 32 calibration crops, each calibrated on nested seeded subsets of n crops; held-out "
        "1 − cosine of the class token on 32 evaluation crops of other photos, mean ± std over draws, and in "
        "brackets the ratio to the defaults on all 32 crops of the same draw. 'defaults': q·kᵀ inputs and the "
        "image min-max, other inputs MSE; 'qk_mse': q·kᵀ inputs MSE; 'qk_mse_image_mse': the image MSE too.\n\n"
        + "\n".join(lines)
        + f"\n\nWhole run: {total:.0f} s."
    )
    write_section(
        "bench_real_vit_calib_size", body, " ".join(["python benchmarks/bench_real_vit_calib_size.py", *sys.argv[1:]])
    )
    write_json("real_vit_calib_size.json", {"rows": rows, "seconds": total, "complete": True})


if __name__ == "__main__":
    main()
