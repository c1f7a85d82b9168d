"""Seconds of DINOv2-S/14's forward on 32 crops against the batch size, in float and quantized W4A4.

LampQ measures J with many forwards on the same images (single-layer probes, each round, the uniform
fallback); `LampQConfig.batch_size` sets their batch. This benchmark times the float forward (`jax.jit` of
`model.apply`) and the uniform W4A4 model's (`QuantizationResult.apply`) over the 32 calibration crops of draw
0, in batches of 32, 16, 8 and 4: medians of interleaved repeats, and the ratio to one batch of 32.

    python benchmarks/bench_forward_batch.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import batched, interleaved_medians, write_results  # noqa: E402

import jax  # noqa: E402

import lampq_jax  # noqa: E402
from lampq_jax.data.photos import photo_crops  # noqa: E402
from lampq_jax.models.dinov2_onnx import load_dinov2_s14, normalize_imagenet  # noqa: E402

BATCHES = (32, 16, 8, 4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    start = time.perf_counter()
    model, variables = load_dinov2_s14()
    crops = normalize_imagenet(photo_crops("calibration", 32, 224, seed=0))
    float_apply = jax.jit(lambda x: model.apply(variables, x, train=False))
    uniform = lampq_jax.quantize_uniform(model, variables, crops, 4, train=False)
    forwards = {"float": float_apply, "W4A4": uniform.apply}
    fns = {
        (name, batch): (lambda fn=fn, batch=batch: batched(fn, crops, batch))
        for name, fn in forwards.items()
        for batch in BATCHES
    }
    for fn in fns.values():  # compile every shape first
        fn()
    seconds = interleaved_medians(fns, args.repeats)
    lines = ["| batch | float (s) | × batch 32 | W4A4 (s) | × batch 32 |", "|---:|---:|---:|---:|---:|"]
    for batch in BATCHES:
        cells = [
            f"{seconds[(name, batch)]:.2f} | {seconds[(name, batch)] / seconds[(name, 32)]:.2f}" for name in forwards
        ]
        lines.append(f"| {batch} | " + " | ".join(cells) + " |")
    heading = (
        "## Forward seconds against the batch size (DINOv2-S/14, 32 crops)\n\n"
        "The 32 calibration crops of draw 0 through the float model (`jax.jit(model.apply)`) and the uniform W4A4 "
        f"model (`QuantizationResult.apply`), in batches of {', '.join(map(str, BATCHES))}: medians of "
        f"{args.repeats} interleaved repeats after one compiling call each. LampQ's forwards that measure J run in "
        "batches of `LampQConfig.batch_size` (8 by default).\n\n"
    )
    data = {"repeats": args.repeats, "medians": {f"{n} {b}": s for (n, b), s in seconds.items()}}
    write_results("bench_forward_batch", heading, lines, start, data)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
