"""The real-ViT probe under activation-range choices: where W8A8's accuracy loss comes from.

The yardstick's linear probe (`bench_real_vit.py`: DINOv2-S/14, a head on the FP class token of
Fashion-MNIST at 224²) is scored on `quantize_uniform` models calibrated on 32 Fashion-MNIST training
images, with: the default quantizers (MSE-searched ranges; run twice, in one process, for the spread
between runs), the patch embedding's input calibrated min-max (`minmax_types=('embed',)`: the image's
whole range is kept), and every range by min-max or by percentile. Beside accuracy: flips (test images
whose predicted class differs from FP's), the mean relative error ‖f_Q − f‖ / ‖f‖ of the class token, and
the photos' class-token cosine at the same settings (32 evaluation crops, calibrated on 32 other crops).

    python benchmarks/bench_real_vit_probe.py [--bits 8 4] [--probe-test 1000]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_real_vit import PROBE_FILE, class_tokens, cosines, fmnist_224  # noqa: E402
from common import write_json, write_section  # noqa: E402

import lampq_jax  # noqa: E402
from lampq_jax.data.fashion_mnist import load_fashion_mnist  # noqa: E402
from lampq_jax.data.photos import photo_crops  # noqa: E402
from lampq_jax.models.dinov2_onnx import load_dinov2_s14, normalize_imagenet  # noqa: E402

# (label, quantize_uniform options, bits it runs at: None for all of --bits)
VARIANTS = (
    ("default quantizers", {}, None),
    ("default quantizers, again", {}, (8,)),
    ("embedding input min-max (minmax_types=('embed',))", {"minmax_types": ("embed",)}, None),
    ("every range min-max (calibration='minmax')", {"calibration": "minmax"}, None),
    ("every range by percentile (calibration='percentile')", {"calibration": "percentile"}, (8,)),
)


def predictions(probe: dict[str, np.ndarray], features: np.ndarray) -> np.ndarray:
    """[N] classes of the linear probe on class tokens [N, D]."""
    return np.argmax(((features - probe["mean"]) / probe["std"]) @ probe["w"] + probe["b"], axis=-1)


def probe_row(probe, fp_features, quantized_features, labels) -> dict[str, float]:
    """Accuracy (%), flips against FP, and the mean relative class-token error of one quantized model."""
    fp_pred, q_pred = predictions(probe, fp_features), predictions(probe, quantized_features)
    rel = np.linalg.norm(quantized_features - fp_features, axis=-1) / np.linalg.norm(fp_features, axis=-1)
    return {
        "accuracy": float(100 * np.mean(q_pred == labels)),
        "flips": int(np.sum(q_pred != fp_pred)),
        "rel_error": float(rel.mean()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=int, nargs="+", default=[8, 4])
    parser.add_argument("--probe-train", type=int, default=1000)
    parser.add_argument("--probe-test", type=int, default=1000)
    parser.add_argument("--calib", type=int, default=32)
    args = parser.parse_args()
    if not PROBE_FILE.is_file():
        raise SystemExit(f"{PROBE_FILE} is missing: run benchmarks/bench_real_vit.py first (it trains the probe)")
    start_all = time.perf_counter()
    model, variables = load_dinov2_s14(tokens=True)
    with np.load(PROBE_FILE) as f:
        probe = {k: f[k] for k in f.files}
    test_x, test_y = (a[: args.probe_test] for a in load_fashion_mnist("test"))
    task_calib = fmnist_224(load_fashion_mnist("train")[0][args.probe_train : args.probe_train + args.calib])
    photo_calib = normalize_imagenet(photo_crops("calibration", 32, 224))
    evaluation = normalize_imagenet(photo_crops("evaluation", 32, 224))
    fp_fn = jax.jit(lambda x: model.apply(variables, x, train=False))
    fp_features = class_tokens(fp_fn, test_x)
    fp_photos = np.asarray(fp_fn(evaluation))
    fp_acc = float(100 * np.mean(predictions(probe, fp_features) == test_y))
    print(f"FP probe accuracy {fp_acc:.2f} %", flush=True)

    rows = []
    for label, options, only in VARIANTS:
        for bits in [b for b in args.bits if only is None or b in only]:
            start = time.perf_counter()
            task = lampq_jax.quantize_uniform(model, variables, task_calib, bits, train=False, **options)
            row = probe_row(probe, fp_features, class_tokens(lambda x: task.apply(x, train=False), test_x), test_y)
            photos = lampq_jax.quantize_uniform(model, variables, photo_calib, bits, train=False, **options)
            row["photo_cls_cosine"] = cosines(np.asarray(photos.apply(evaluation, train=False)), fp_photos)[0]
            rows.append({"setting": label, "bits": bits, **row, "seconds": time.perf_counter() - start})
            print(rows[-1], flush=True)

    table = [
        "| setting | WbAb | probe accuracy (%) | flips vs FP | class-token rel. error | photo class-token cosine "
        "| seconds |",
        "|---|---|---:|---:|---:|---:|---:|",
        f"| full precision | FP32 | {fp_acc:.2f} | 0 | 0 | 1.0000 | |",
    ]
    for r in rows:
        table.append(
            f"| {r['setting']} | W{r['bits']}A{r['bits']} | {r['accuracy']:.2f} | {r['flips']} | {r['rel_error']:.4f} "
            f"| {r['photo_cls_cosine']:.4f} | {r['seconds']:.0f} |"
        )
    total = time.perf_counter() - start_all
    body = (
        "## Real-ViT probe: where W8A8's accuracy goes (DINOv2-S/14, Fashion-MNIST linear probe)\n\n"
        f"Probe of `bench_real_vit.py` on the first {args.probe_test} Fashion-MNIST test images (224²); each model "
        f"calibrated on {args.calib} Fashion-MNIST training images outside the probe's training set. Photo "
        "cosine: the same settings calibrated on 32 photo crops, scored on 32 others. Flips: test images whose "
        "predicted class differs from full precision's.\n\n" + "\n".join(table) + f"\n\nWhole run: {total:.0f} s."
    )
    command = "python benchmarks/bench_real_vit_probe.py " + " ".join(sys.argv[1:])
    write_section("bench_real_vit_probe", body, command.strip())
    write_json("real_vit_probe.json", {"fp_probe_accuracy": fp_acc, "rows": rows, "seconds": total})


if __name__ == "__main__":
    main()
