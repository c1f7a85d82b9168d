"""Uniform WbAb on the embedded Fashion-MNIST ViT (17 tokens): the quantizers' check on the toy model.

Accuracy on the 2,000 embedded test images; 32 calibration images. Rows: the default quantizers, the
same with the image (the patch embedding's input) clipped by the MSE search instead of min-max
(`minmax_types=()`, the default before 2026-12-05), and with every input per tensor (`channel_types=()`,
the quantizers before the real-ViT yardstick).

    python benchmarks/bench_uniform_embedded.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_results  # noqa: E402

import lampq_jax  # noqa: E402
from lampq_jax.data.embedded import load_embedded_model, load_embedded_subset  # noqa: E402


def main() -> None:
    start_all = time.perf_counter()
    model, variables, _ = load_embedded_model()
    data = load_embedded_subset()
    calib, images, labels = data["calib_images"][:32], data["test_images"], data["test_labels"]
    fp = float(np.mean(np.asarray(model.apply(variables, images, train=False)).argmax(-1) == labels) * 100)
    rows = []
    settings = (
        ("default quantizers", {}),
        ("embedding input clipped (MSE)", {"minmax_types": ()}),
        ("every input per tensor", {"channel_types": ()}),
    )
    for label, options in settings:
        for bits in (8, 6, 4, 3):
            result = lampq_jax.quantize_uniform(model, variables, calib, bits, train=False, **options)
            acc = float(np.mean(np.asarray(result.apply(images)).argmax(-1) == labels) * 100)
            rows.append({"setting": label, "bits": bits, "accuracy": acc})
            print(rows[-1], flush=True)
    table = [
        "| setting | W8A8 | W6A6 | W4A4 | W3A3 |",
        "|---|---:|---:|---:|---:|",
        f"| full precision: {fp:.2f} % | | | | |",
    ]
    for label, _ in settings:
        accs = {r["bits"]: r["accuracy"] for r in rows if r["setting"] == label}
        table.append(f"| {label} | " + " | ".join(f"{accs[b]:.2f}" for b in (8, 6, 4, 3)) + " |")
    heading = "## Uniform WbAb on the embedded Fashion-MNIST ViT (test accuracy, %, 2,000 images)\n\n"
    write_results("bench_uniform_embedded", heading, table, start_all, {"fp_accuracy": fp, "rows": rows})


if __name__ == "__main__":
    main()
