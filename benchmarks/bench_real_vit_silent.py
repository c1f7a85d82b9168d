"""The silent-channel threshold of the per-channel input ranges, uniform WbAb on DINOv2-S/14, over draws.

A per-channel site's channel whose calibrated max (min) is below `SILENT_CHANNEL` × the median channel's gets the
median's range (`lampq_jax.apply.calibration`): post-GELU fc2 channels that stay below 0 on the calibration
crops reach 0.3–2.5 on other photos. `bench_real_vit_parts.py` compares thresholds on one set of 16 / 16
crops; this benchmark takes each draw's 32 calibration crops (`photo_crops('calibration', 32, 224,
seed=draw)`, those of `bench_real_vit_lampq.py`) and scores on the same 32 evaluation crops of other photos:
1 − cosine of the class token, and its ratio to the default threshold's in the same draw.

    python benchmarks/bench_real_vit_silent.py [--bits 4 3] [--draws 3] [--thresholds 0.05 0.2 0.5 1.0]
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
from bench_real_vit_parts import variant  # noqa: E402
from common import write_json, write_section  # noqa: E402

import lampq_jax  # noqa: E402
import lampq_jax.apply.calibration as calibration  # noqa: E402
from lampq_jax.data.photos import photo_crops  # noqa: E402
from lampq_jax.models.dinov2_onnx import normalize_imagenet  # noqa: E402

DEFAULT = calibration.SILENT_CHANNEL


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=int, nargs="+", default=[4, 3])
    parser.add_argument("--draws", type=int, default=3)
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.05, DEFAULT, 0.5, 1.0])
    args = parser.parse_args()
    thresholds = sorted(set(args.thresholds) | {DEFAULT})
    start_all = time.perf_counter()
    model, variables, _, evaluation, ref = dinov2_and_evaluation()
    rows = []
    for draw in range(args.draws):
        crops = normalize_imagenet(photo_crops("calibration", 32, 224, seed=draw))
        for bits in args.bits:
            for threshold in thresholds:

                def score():
                    result = lampq_jax.quantize_uniform(model, variables, crops, bits, train=False)
                    return one_minus_cos(jax.jit(lambda x: result.apply(x, train=False)), evaluation, ref)

                value = variant("silent", bits, score, s=(calibration, "SILENT_CHANNEL", threshold))
                rows.append({"draw": draw, "bits": bits, "threshold": threshold, "eval_1mcos": value})
                print(rows[-1], flush=True)
                write_json("real_vit_silent.json", {"rows": rows, "complete": False})

    def of(bits, threshold):
        return np.array([r["eval_1mcos"] for r in rows if r["bits"] == bits and r["threshold"] == threshold])

    lines = [
        "| bits | threshold | held-out 1 − cos | ratio to the default's (" + f"{DEFAULT}" + ") | draws better |",
        "|---:|---:|---:|---:|---:|",
    ]
    for bits in args.bits:
        for threshold in thresholds:
            values, ratio = of(bits, threshold), of(bits, threshold) / of(bits, DEFAULT)
            lines.append(
                f"| {bits} | {threshold:g}{' (default)' if threshold == DEFAULT else ''} | {values.mean():.4f} ± "
                f"{values.std():.4f} | {ratio.mean():.2f} ± {ratio.std():.2f} | "
                f"{int((ratio < 1).sum())} of {len(ratio)} |"
            )
    total = time.perf_counter() - start_all
    body = (
        "## Silent-channel threshold of the per-channel input ranges: uniform WbAb on DINOv2-S/14\n\n"
        f"{args.draws} draws of 32 calibration crops, scored on 32 evaluation crops of other photos (class-token "
        "1 − cosine, mean ± std over draws); ratio: over the default threshold's in the same draw. Every other "
        "base quantizer at its default.\n\n" + "\n".join(lines) + f"\n\nWhole run: {total:.0f} s."
    )
    write_section(
        "bench_real_vit_silent", body, " ".join(["python benchmarks/bench_real_vit_silent.py", *sys.argv[1:]])
    )
    write_json("real_vit_silent.json", {"rows": rows, "seconds": total, "complete": True})


if __name__ == "__main__":
    main()
