"""Overhead of a jitted fake-quantized forward over the full-precision forward.

ViT-S/16, batch 8, 224×224×3, W4A4 (embed/head W8A8, attention inputs at 4 bits, log-grid softmax).
Goal: at most 1.5×.

    python benchmarks/bench_fakequant.py [--repeats 20]
"""

from __future__ import annotations

import argparse
import sys

import jax

from common import interleaved_medians, write_json, write_section

import lampq_jax


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()

    model = lampq_jax.create_vit("S/16", 1000)
    images = jax.random.normal(jax.random.key(0), (args.batch, 224, 224, 3))
    variables = model.init(jax.random.key(1), images[:1])
    result = lampq_jax.quantize_uniform(model, variables, images, 4, train=False)
    fp_apply = jax.jit(lambda v, x: model.apply(v, x, train=False))
    fns = {"fp": lambda: fp_apply(variables, images), "fake_quant": lambda: result.apply(images)}
    for fn in fns.values():  # compile and warm up
        jax.block_until_ready(fn())
    times = interleaved_medians(fns, args.repeats)
    ratio = times["fake_quant"] / times["fp"]
    print(f"fp {times['fp'] * 1e3:.1f} ms, fake-quant {times['fake_quant'] * 1e3:.1f} ms, ratio {ratio:.3f}")
    body = (
        "## Fake-quantization overhead (ViT-S/16, batch 8, 224², W4A4)\n\n"
        "| forward (jitted) | median ms | ratio |\n|---|---:|---:|\n"
        f"| full precision | {times['fp'] * 1e3:.1f} | 1.00 |\n"
        f"| fake-quantized (interceptor) | {times['fake_quant'] * 1e3:.1f} | {ratio:.2f} |\n\n"
        f"Goal: ratio ≤ 1.5 — {'met' if ratio <= 1.5 else 'NOT met'}. Medians of {args.repeats} interleaved runs."
    )
    write_section("bench_fakequant", body, "python benchmarks/bench_fakequant.py")
    write_json("fakequant_overhead.json", {"vit_s16_b8_ratio": round(ratio, 4)})


if __name__ == "__main__":
    sys.exit(main())
