"""How much the quantized real ViT's output depends on float rounding alone (DINOv2-S/14).

The same images through the same fake-quantized model, once as one batch of 16 and once as two batches of
8: the inputs, the quantizers and the bits are identical, only XLA's float rounding differs (its kernels
depend on the batch size). A model whose quantized output is a smooth function of its inputs gives the
same figures both ways; where a rounding-level difference flips activation codes that matter, an image's
class-token cosine to full precision jumps. Issue 11 found J non-monotone in the weights' bits at W4A4
(`bench_real_vit_context.py`); this table shows where that comes from. Rows: the default base quantizers
and the same with query/key equalization (`equalize_qk=True`), weight bits 4-6, inputs of the linear
layers at 4 or 8, inputs of q·kᵀ (q, k) and of softmax·v (softmax, v) at 4 or 8, on the 16 calibration
crops and 16 held-out evaluation crops.

    python benchmarks/bench_real_vit_rounding.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_real_vit_ceiling import allocation_units, assignment_apply, cosines, prepared_dinov2  # noqa: E402
from common import write_results  # noqa: E402

from lampq_jax.apply.static import static_module  # noqa: E402

# (weight bits, linear layers' input bits, q·kᵀ input bits, softmax·v input bits)
SETTINGS = ((4, 4, 4, 4), (5, 4, 4, 4), (6, 4, 4, 4), (5, 4, 8, 4), (5, 4, 4, 8), (5, 8, 4, 4), (5, 8, 8, 4))
VARIANTS = {"default quantizers": {}, "query/key equalization": {"equalize_qk": True}}


def main() -> None:
    start = time.perf_counter()
    rows = []
    for variant, options in VARIANTS.items():
        model, prep, dq, calibration, evaluation, fp_apply = prepared_dinov2(**options)
        static_model = static_module(model)
        fixed, allocated, _, _, _ = allocation_units(prep)
        for set_name, images in (("calibration", calibration[:16]), ("held-out", evaluation[16:])):
            ref = np.asarray(fp_apply(images))
            for w, a, qk, pv in SETTINGS:
                bits = {**{l.path: (w, a) for l in allocated}, **fixed}
                run = assignment_apply(static_model, prep, dq, bits, {p: (qk, pv) for p in prep.attention})
                whole = cosines(np.asarray(run(images)), ref)
                halves = cosines(np.concatenate([np.asarray(run(images[:8])), np.asarray(run(images[8:]))]), ref)
                rows.append(
                    {
                        "variant": variant,
                        "images": set_name,
                        "bits": [w, a, qk, pv],
                        "j_batch16": float(1 - whole.mean()),
                        "j_batch8": float(1 - halves.mean()),
                        "max_image_change": float(np.abs(whole - halves).max()),
                    }
                )
                print(rows[-1], flush=True)
    lines = [
        "| base quantizers | crops | W | A (linear inputs) | q·kᵀ inputs | softmax·v inputs | J, batch 16 | J, 2 × 8 "
        "| largest change of one image's cosine |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        w, a, qk, pv = r["bits"]
        lines.append(
            f"| {r['variant']} | {r['images']} | {w} | {a} | {qk} | {pv} | {r['j_batch16']:.4f} | {r['j_batch8']:.4f} "
            f"| {r['max_image_change']:.4f} |"
        )
    heading = (
        "## Float-rounding sensitivity of the quantized real ViT (DINOv2-S/14)\n\n"
        "The same 16 crops through the same fake-quantized model as one batch of 16 and as two batches of 8: only "
        "XLA's float rounding differs. J = mean (1 − class-token cosine to full precision). Base quantizers "
        "calibrated on the 32 calibration crops; embed / head at 8.\n\n"
    )
    write_results("bench_real_vit_rounding", heading, lines, start, {"rows": rows})


if __name__ == "__main__":
    main()
