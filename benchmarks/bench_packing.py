"""Bytes of an exported (packed low-bit) ViT-B/16 against its float32 weights.

A real result is built and exported: `quantize_uniform` at 4 bits (embedding and head at 8, the
library's default), then `export_result` packs every quantized kernel at its bits, and

    ratio = export_nbytes(tensors, variables) / (4 · #params)

counts packed codes, float32 scales and zero points (8 bytes per output channel) and every other
parameter (biases, LayerNorms, position embedding, class token) in float32. Goal: ≤ 0.14.
The figure depends only on the bits and the shapes, not on the weights or the calibration
images, so random weights and two random 224² images stand in for a trained model.

A second table gives bytes per weight of one [768, 3072] kernel (a ViT-B fc1) at 2..8 bits,
scales included.

    cd benchmarks && ../.venv/bin/python bench_packing.py
"""

from __future__ import annotations

import sys
import time

import jax
import numpy as np

from common import write_json, write_section

import lampq_jax
from lampq_jax.deploy.export import container_bits, export_nbytes, export_result
from lampq_jax.quant.qtensor import QuantizedTensor

GOAL = 0.14


def per_bit_table() -> list[tuple[int, int, float]]:
    """(bits, container bits, bytes per weight) of a [768, 3072] kernel, scales and zero points included."""
    w = jax.random.normal(jax.random.key(0), (768, 3072))
    rows = []
    for bits in range(2, 9):
        qt = QuantizedTensor.from_float(w, container_bits(bits))
        rows.append((bits, qt.bits, qt.nbytes / w.size))
    return rows


def main() -> None:
    model = lampq_jax.create_vit("B/16", 1000)
    images = jax.random.normal(jax.random.key(0), (2, 224, 224, 3))
    variables = jax.jit(lambda x: model.init(jax.random.key(1), x, train=False))(images[:1])
    num_params = sum(int(np.prod(np.shape(x))) for x in jax.tree.leaves(variables["params"]))

    start = time.perf_counter()
    result = lampq_jax.quantize_uniform(model, variables, images, 4, calibration="minmax", train=False)
    quantize_s = time.perf_counter() - start
    start = time.perf_counter()
    tensors = export_result(result)
    export_s = time.perf_counter() - start

    nbytes = export_nbytes(tensors, variables)
    ratio = nbytes / (4 * num_params)
    layers = result.quantized.layers
    weights = sum(l.num_weights for l in layers)
    avg_bits = sum(l.num_weights * result.bits[l.path][0] for l in layers) / weights
    codes = sum(int(t.packed.size) for t in tensors.values())
    scales = sum(4 * int(t.scale.size) + 4 * int(t.zero_point.size) for t in tensors.values())
    other = nbytes - codes - scales
    print(
        f"ViT-B/16: {num_params:,} params, {len(tensors)} exported layers, avg {avg_bits:.3f} weight bits; "
        f"{nbytes:,} bytes = codes {codes:,} + scales/zeros {scales:,} + float params {other:,}; "
        f"ratio {ratio:.4f}; quantize {quantize_s:.0f} s, export {export_s:.0f} s"
    )
    table = per_bit_table()
    for bits, container, per_weight in table:
        print(f"{bits} bits (container {container}): {per_weight:.4f} bytes/weight")

    rows = "\n".join(f"| {b} | {c} | {p:.4f} | {p / 4:.4f} |" for b, c, p in table)
    body = (
        "## Packed model size (ViT-B/16, average 4 bits)\n\n"
        f"Real result: `quantize_uniform` at W4A4 with embedding and head at 8 bits (uniform, not a LampQ "
        f"mixed assignment), exported with `export_result`; average weight bits over the {len(tensors)} "
        f"quantized layers {avg_bits:.3f}.\n\n"
        "| part | bytes |\n|---|---:|\n"
        f"| packed codes | {codes:,} |\n"
        f"| scales + zero points (float32, per output channel) | {scales:,} |\n"
        f"| other parameters (float32) | {other:,} |\n"
        f"| **total** | **{nbytes:,}** |\n"
        f"| float32 model ({num_params:,} params × 4) | {4 * num_params:,} |\n\n"
        f"Ratio packed / float32 = **{ratio:.4f}** (goal ≤ {GOAL}: {'met' if ratio <= GOAL else 'NOT met'}). "
        f"Quantize {quantize_s:.0f} s, export {export_s:.0f} s on this machine.\n\n"
        "Bytes per weight of a [768, 3072] kernel, scales and zero points included "
        "(7 bits is stored in the 8-bit container):\n\n"
        "| bits | container | bytes / weight | vs float32 |\n|---:|---:|---:|---:|\n" + rows
    )
    write_section("bench_packing", body, "cd benchmarks && ../.venv/bin/python bench_packing.py")
    write_json(
        "packing.json",
        {
            "vit_b16_avg4_bytes_ratio": round(ratio, 5),
            "vit_b16_avg_weight_bits": round(avg_bits, 4),
            "vit_b16_export_bytes": nbytes,
            "vit_b16_params": num_params,
            "bytes_per_weight_768x3072": {str(b): round(p, 5) for b, _, p in table},
        },
    )


if __name__ == "__main__":
    sys.exit(main())
