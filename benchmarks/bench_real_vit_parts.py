"""Where the real ViT's quantization error comes from, and the measurements behind the quantizers' defaults.

On the DINOv2-S/14 (16 calibration / 16 held-out evaluation photo crops, class-token cosine to FP):
1. one part of the model quantized at a time (the rest in float), at W8A8 and W4A4;
2. the defaults' alternatives: the per-channel range floor, the silent-channel threshold, the softmax
   floor factor F, and query/key equalization, at W8A8 and W4A4 (uniform, everything quantized);
3. the Fashion-MNIST probe's sensitivity: the class token's relative error at W8A8, raw and after the
   probe's standardization (300 test images, calibrated on 32 training images);
4. a randomly initialized ViT-Ti/16 (4 blocks, 224², random images): W8A8 relative error, part by part.

    python benchmarks/bench_real_vit_parts.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_real_vit import PROBE_FILE, class_tokens, fmnist_224  # noqa: E402
from common import write_results  # noqa: E402

import lampq_jax  # noqa: E402
import lampq_jax.apply.calibration as calibration  # noqa: E402
import lampq_jax.quant.traced as traced  # noqa: E402
from lampq_jax.apply.dynamic import dynamic_apply, dynamic_bits  # noqa: E402
from lampq_jax.apply.fake import layer_kernels, with_kernels  # noqa: E402
from lampq_jax.data.fashion_mnist import load_fashion_mnist  # noqa: E402
from lampq_jax.data.photos import photo_crops  # noqa: E402
from lampq_jax.models.dinov2_onnx import load_dinov2_s14, normalize_imagenet  # noqa: E402

KWARGS = (("train", False),)


def class_cosine(out, ref) -> float:
    out, ref = np.asarray(out), np.asarray(ref)
    cos = np.sum(out * ref, -1) / (np.linalg.norm(out, axis=-1) * np.linalg.norm(ref, axis=-1))
    return float(cos[:, 0].mean())


def prepared_float_variables(variables, quantized):
    """The float kernels of `variables` with every other leaf from the result (its key biases are centered).

    The result's own variables hold fake-quantized kernels, and calibration saw the model after key
    centering (`LampQConfig.center_keys`), so a part run on the raw `variables` would put the keys off
    the grid their quantizer was calibrated on.
    """

    def pick(path, raw, prepared):
        return raw if jax.tree_util.keystr(path).endswith("['kernel']") else prepared

    return jax.tree_util.tree_map_with_path(pick, variables, quantized.variables)


def part_runs(model, variables, result, images, ref, measure):
    """{part: measure(output)} with one part quantized as the result quantizes it, the rest in float.

    A part's weights are the result's own kernels (GPTQ codes where the result has them) and its inputs the
    result's activation grids at its bits; every other kernel is float and every other site unquantized.
    """
    quantized = result.quantized
    float_variables = prepared_float_variables(variables, quantized)
    layers, bits = quantized.layers, quantized.spec.bits
    kernels = layer_kernels(quantized.variables, [l.path for l in layers])
    attention = [p for p, _ in quantized.spec.attention]
    attn_bits = dict(quantized.spec.attention)

    def layer_part(t, weights=True, acts=True):
        paths = [l.path for l in layers if l.type == t]
        part_variables = with_kernels(float_variables, {p: kernels[p] for p in paths} if weights else {})
        state = dynamic_bits(quantized.act_params, attention, {p: (0, bits[p][1]) for p in paths} if acts else {})
        return dynamic_apply(part_variables, state, images, model=model, kwargs=KWARGS)

    def attention_only(sites, softmax):
        state = dynamic_bits(quantized.act_params, attention, {}, attn_bits)
        site_bits = {s: (b if s.endswith(sites) else np.int32(0)) for s, b in state.site_bits.items()}
        softmax_bits = {p: (b if softmax else np.int32(0)) for p, b in state.softmax_bits.items()}
        state = state._replace(site_bits=site_bits, softmax_bits=softmax_bits)
        return dynamic_apply(float_variables, state, images, model=model, kwargs=KWARGS)

    runs = {t: lambda t=t: layer_part(t) for t in ("embed", "qkv", "proj", "fc1", "fc2")}
    runs["fc2 weights"] = lambda: layer_part("fc2", acts=False)
    runs["fc2 inputs"] = lambda: layer_part("fc2", weights=False)
    if attention:
        runs["q and k"] = lambda: attention_only(("/q", "/k"), False)
        runs["v"] = lambda: attention_only(("/v",), False)
        runs["softmax"] = lambda: attention_only(("/none",), True)
    return {name: measure(fn(), ref) for name, fn in runs.items()}


def variant(name, bits, run, **constants):
    """Runs `run()` with module constants replaced (and jit caches cleared, as they are read at trace time)."""
    saved = {key: getattr(module, attr) for key, (module, attr, _) in constants.items()}
    try:
        for module, attr, value in constants.values():
            setattr(module, attr, value)
        jax.clear_caches()
        return run()
    finally:
        for key, (module, attr, _) in constants.items():
            setattr(module, attr, saved[key])
        jax.clear_caches()


def main() -> None:
    start_all = time.perf_counter()
    model, variables = load_dinov2_s14(tokens=True)
    calib = normalize_imagenet(photo_crops("calibration", 16, 224))
    evaluation = normalize_imagenet(photo_crops("evaluation", 16, 224))
    ref = np.asarray(jax.jit(lambda x: model.apply(variables, x, train=False))(evaluation))
    out: dict = {"parts": {}, "variants": {}}

    def uniform(bits, **options):
        return lampq_jax.quantize_uniform(model, variables, calib, bits, train=False, **options)

    for bits in (8, 4):
        out["parts"][bits] = part_runs(model, variables, uniform(bits), evaluation, ref, class_cosine)
        print(bits, out["parts"][bits], flush=True)

    floor = (calibration, "CHANNEL_RANGE_FLOOR")
    variants = {
        "defaults": {},
        "range floor: none": {"f": (*floor, (0.0,) * 9)},
        "range floor: 0.5 at every width": {"f": (*floor, (0.5,) * 9)},
        "range floor: 0.9 at every width": {"f": (*floor, (0.9,) * 9)},
        "silent channels: off": {"s": (calibration, "SILENT_CHANNEL", -1e9)},
        "silent channels: max < 0 only (threshold 0)": {"s": (calibration, "SILENT_CHANNEL", 0.0)},
        "silent channels: 0.05": {"s": (calibration, "SILENT_CHANNEL", 0.05)},
        "silent channels: 0.5": {"s": (calibration, "SILENT_CHANNEL", 0.5)},
        "softmax F = 16": {"F": (traced, "SOFTMAX_FLOOR_FACTOR", 16.0)},
        "softmax F = 256": {"F": (traced, "SOFTMAX_FLOOR_FACTOR", 256.0)},
        "query/key equalization": "equalize",
    }
    for name, constants in variants.items():
        row = {}
        for bits in (8, 4):
            if constants == "equalize":
                output = uniform(bits, equalize_qk=True).apply(evaluation, train=False)
            else:  # quantize and apply under the variant: calibration and the softmax read the constants
                output = variant(name, bits, lambda: uniform(bits).apply(evaluation, train=False), **constants)
            row[bits] = class_cosine(output, ref)
        out["variants"][name] = row
        print(name, row, flush=True)

    # 3. The Fashion-MNIST probe's sensitivity at W8A8.
    with np.load(PROBE_FILE) as f:
        probe = {k: f[k] for k in f.files}
    train_x = load_fashion_mnist("train")[0]
    test_x = load_fashion_mnist("test")[0][:300]
    fp_fn = jax.jit(lambda x: model.apply(variables, x, train=False))
    task = lampq_jax.quantize_uniform(model, variables, fmnist_224(train_x[1000:1032]), 8, train=False)
    fp_tokens = class_tokens(fp_fn, test_x)
    q_tokens = class_tokens(lambda x: task.apply(x, train=False), test_x)
    standard = lambda f: (f - probe["mean"]) / probe["std"]  # noqa: E731
    out["probe"] = {
        "cosine": float(
            np.mean(
                np.sum(q_tokens * fp_tokens, -1)
                / (np.linalg.norm(q_tokens, axis=-1) * np.linalg.norm(fp_tokens, axis=-1))
            )
        ),
        "relative_error": float(np.linalg.norm(q_tokens - fp_tokens) / np.linalg.norm(fp_tokens)),
        "standardized_relative_error": float(
            np.linalg.norm(standard(q_tokens) - standard(fp_tokens)) / np.linalg.norm(standard(fp_tokens))
        ),
    }
    print(out["probe"], flush=True)

    # 4. A random ViT-Ti/16 (4 blocks) at 224²: W8A8 relative error, part by part.
    rand_model = lampq_jax.create_vit("Ti/16", None, num_layers=4)
    images = np.asarray(jax.random.normal(jax.random.key(0), [8, 224, 224, 3]))
    rand_vars = rand_model.init(jax.random.key(1), images[:1], train=False)
    rand_ref = np.asarray(rand_model.apply(rand_vars, images[4:], train=False))
    rand_result = lampq_jax.quantize_uniform(rand_model, rand_vars, images[:4], 8, train=False)
    rel = lambda o, r: float(np.linalg.norm(np.asarray(o) - r) / np.linalg.norm(r))  # noqa: E731
    out["random_vit"] = {
        "all": rel(rand_result.apply(images[4:], train=False), rand_ref),
        **part_runs(rand_model, rand_vars, rand_result, images[4:], rand_ref, rel),
    }
    print(out["random_vit"], flush=True)

    names = list(out["parts"][8])
    lines = [
        "### One part quantized, the rest in float (class-token cosine)",
        "",
        "| part | W8A8 | W4A4 |",
        "|---|---:|---:|",
    ]
    lines += [f"| {n} | {out['parts'][8][n]:.4f} | {out['parts'][4][n]:.4f} |" for n in names]
    lines += [
        "",
        "### The defaults and their alternatives, whole model uniform (class-token cosine)",
        "",
        "| variant | W8A8 | W4A4 |",
        "|---|---:|---:|",
    ]
    lines += [f"| {n} | {r[8]:.4f} | {r[4]:.4f} |" for n, r in out["variants"].items()]
    p = out["probe"]
    lines += [
        "",
        "### Fashion-MNIST probe at W8A8 (300 test images, calibrated on 32 training images)",
        "",
        f"Class-token cosine {p['cosine']:.4f}; relative error {p['relative_error']:.3f}, after the probe's "
        f"standardization {p['standardized_relative_error']:.3f}.",
        "",
        "### Random ViT-Ti/16 (4 blocks, 224², Gaussian images): W8A8 relative error",
        "",
        "| part | relative error |",
        "|---|---:|",
    ]
    lines += [f"| {n} | {v:.4f} |" for n, v in out["random_vit"].items()]
    heading = "## Real-ViT diagnostics: DINOv2-S/14, 16 calibration / 16 held-out crops\n\n"
    write_results("bench_real_vit_parts", heading, lines, start_all, out)


if __name__ == "__main__":
    main()
