"""Uniform WbAb on the real DINOv2-S/14 with each weight rounding: GPTQ (default) and round-to-nearest.

Same crops as `bench_real_vit.py` (32 calibration / 32 held-out evaluation photo crops); class-token and
all-token cosine to full precision, and the time of `quantize_uniform` (calibration, weights) per run.

    python benchmarks/bench_real_vit_weights.py [--methods gptq rtn] [--bits 8 6 5 4 3]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_real_vit import cosines  # noqa: E402
from common import write_section  # noqa: E402

import lampq_jax  # noqa: E402
from lampq_jax.data.photos import photo_crops  # noqa: E402
from lampq_jax.models.dinov2_onnx import load_dinov2_s14, normalize_imagenet  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--methods", nargs="+", default=["gptq", "rtn"])
    parser.add_argument("--bits", nargs="+", type=int, default=[8, 6, 5, 4, 3])
    args = parser.parse_args()
    start = time.perf_counter()
    model, variables = load_dinov2_s14(tokens=True)
    calib = normalize_imagenet(photo_crops("calibration", 32, 224))
    evaluation = normalize_imagenet(photo_crops("evaluation", 32, 224))
    ref = np.asarray(jax.jit(lambda x: model.apply(variables, x, train=False))(evaluation))
    rows = []
    for method in args.methods:
        for bits in args.bits:
            t = time.perf_counter()
            result = lampq_jax.quantize_uniform(model, variables, calib, bits, train=False, weight_method=method)
            seconds = time.perf_counter() - t
            cls, every = cosines(np.asarray(result.apply(evaluation, train=False)), ref)
            rows.append(f"| {method} | W{bits}A{bits} | {cls:.4f} | {every:.4f} | {seconds:.0f} |")
            print(rows[-1], flush=True)
    table = "\n".join(
        ["| weights | bits | class-token cosine | all-token cosine | seconds |", "|---|---|---|---|---|", *rows]
    )
    body = (
        "## Real-ViT weight rounding: GPTQ against round-to-nearest (DINOv2-S/14, uniform WbAb)\n\n"
        "32 calibration / 32 held-out evaluation crops (those of `bench_real_vit.py`); every other base "
        "quantizer at its default.\n\n"
        f"{table}\n\nWhole run: {time.perf_counter() - start:.0f} s."
    )
    write_section(
        "bench_real_vit_weights", body, " ".join(["python benchmarks/bench_real_vit_weights.py", *sys.argv[1:]])
    )


if __name__ == "__main__":
    main()
