"""How close LampQ's Fisher pass is to the cost of any backward pass: DINOv2-S/14, 32 calibration crops.

A Fisher pass (METHOD.md §3) needs at least one forward and one backward over the calibration images: the
per-sample gradient of each layer's input is the backward's own. This benchmark times, on the same 32 crops in
chunks of `LampQConfig.batch_size` (8), each after one compiling call, medians of interleaved repeats:

- 'forward': the float model (`jax.jit(model.apply)`);
- 'forward + backward': the gradient of Σ_n ℓ_n (the Gaussian feature likelihood at targets drawn around
  the outputs, as the true Fisher draws them) with respect to the images, through the float model: the least
  any pass that back-propagates to the first layer costs;
- 'Fisher pass, float point': `fisher_traces` as LampQ's first pass runs it (every layer's weight and input
  traces, input errors at every candidate, every site at 0 bits through the traced-bits interceptor);
- 'Fisher pass, W4A4 point': the same at uniform W4A4, as each round of the iterative updates runs it.

Each row also gives its seconds in forwards. The pass's share above 'forward + backward' is what its own
outputs cost: the per-sample weight gradients x_nᵀ δ_n of 72 layers, the input errors at 6 candidates, and the
fake quantization of the quantized point.

    python benchmarks/bench_real_vit_fisher_floor.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_real_vit_ceiling import prepared_dinov2  # noqa: E402
from common import interleaved_medians, write_json, write_section  # noqa: E402

from lampq_jax.config import LampQConfig  # noqa: E402
from lampq_jax.sensitivity.fisher import fisher_traces, gaussian_log_likelihood, sample_targets  # noqa: E402


def chunked(fn, *arrays, size: int):
    """Runs `fn` on consecutive chunks of `size` rows of `arrays`, waiting for each result."""
    for start in range(0, len(arrays[0]), size):
        jax.block_until_ready(fn(*(a[start : start + size] for a in arrays)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    start_all = time.perf_counter()
    config = LampQConfig()
    model, prep, dq, calibration, _, fp_apply = prepared_dinov2()
    layers = [l for l in prep.layers if l.type not in config.fixed_types]
    size = config.batch_size
    rng = jax.random.key(0)
    targets = np.asarray(sample_targets(fp_apply(calibration), rng, "features"))

    def summed_log_likelihood(x, y):
        out = model.apply(prep.variables, x, train=False)
        return jnp.sum(jax.vmap(lambda o, t: gaussian_log_likelihood(o[None], t))(out, y))

    backward = jax.jit(jax.grad(summed_log_likelihood))
    uniform = {l.path: (4, 4) for l in layers}
    fixed = {l.path: (config.fixed_bits, config.fixed_bits) for l in prep.layers if l.type in config.fixed_types}
    point = dq.point({**uniform, **fixed}, {p: 4 for p in prep.attention})
    common = dict(
        rng=rng,
        batch_size=size,
        output="features",
        act_params=prep.act_params,
        candidates=config.candidates,
        train=False,
    )
    passes = {
        "forward": lambda: chunked(fp_apply, calibration, size=size),
        "forward + backward": lambda: chunked(backward, calibration, targets, size=size),
        "Fisher pass, float point": lambda: fisher_traces(model, prep.variables, calibration, layers, **common),
        "Fisher pass, W4A4 point": lambda: fisher_traces(
            model, prep.variables, calibration, layers, quant=point, **common
        ),
    }
    compile_seconds = {}
    for name, fn in passes.items():
        begin = time.perf_counter()
        fn()
        compile_seconds[name] = time.perf_counter() - begin
    seconds = interleaved_medians(passes, args.repeats)
    one = seconds["forward"]
    rows = [
        {"pass": name, "seconds": seconds[name], "forwards": seconds[name] / one, "first_call": compile_seconds[name]}
        for name in passes
    ]
    for row in rows:
        print(row, flush=True)
    lines = [
        "| pass | seconds | in forwards | first call, with its compilation (s) |",
        "|---|---:|---:|---:|",
        *(f"| {r['pass']} | {r['seconds']:.2f} | {r['forwards']:.2f} | {r['first_call']:.1f} |" for r in rows),
    ]
    total = time.perf_counter() - start_all
    body = (
        "## LampQ's Fisher pass against a bare forward and backward (DINOv2-S/14, 32 crops)\n\n"
        f"The 32 calibration crops of draw 0 in chunks of {size}, medians of {args.repeats} interleaved repeats "
        "after one compiling call each. 'forward + backward': the gradient of the summed Gaussian feature "
        "likelihood with respect to the images through the float model, the least a pass that back-propagates to "
        "the first layer costs. The Fisher passes are `fisher_traces` as LampQ runs them (72 layers' weight and "
        "input traces, input errors at 6 candidates), at the float point (the first pass) and at uniform W4A4 "
        "(each round's).\n\n" + "\n".join(lines) + f"\n\nWhole run: {total:.0f} s."
    )
    write_section("bench_real_vit_fisher_floor", body, "python benchmarks/bench_real_vit_fisher_floor.py")
    write_json("real_vit_fisher_floor.json", {"rows": rows, "repeats": args.repeats, "seconds": total})


if __name__ == "__main__":
    main()
