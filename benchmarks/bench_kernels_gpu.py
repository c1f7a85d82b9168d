"""GPU timing of the Pallas low-bit matmuls against XLA's bfloat16 ``jnp.dot``.

Kernels, for x ``[M, K]`` bfloat16 and a ``[K, N]`` weight (K = N = 4096 by default):

* ``xla_bf16``: ``jnp.dot(x, w_bf16)``, XLA's own GEMM (the baseline);
* ``w4_pallas`` / ``w8_pallas``: ``weight_only_matmul`` with 4- / 8-bit packed weights;
* ``w8a8_pallas``: ``int8_matmul`` on int8 activation and weight codes (the activation
  quantization itself is not timed).

For each M in ``--ms`` (default 1, 8, 64, 256), each kernel is jitted, run ``--warmup`` times,
then timed ``--iters`` times, one call at a time with ``block_until_ready``; the median is
reported, with the speed-up over ``xla_bf16`` and the weight bytes read per microsecond. Every
kernel's output is first checked against its pure-jnp reference. Results go to
``benchmarks/results/kernels_gpu.json`` and a markdown table to stdout.

Usage (on a machine with a GPU):
    python benchmarks/bench_kernels_gpu.py
    python benchmarks/bench_kernels_gpu.py --ms 1 16 --iters 100
    python benchmarks/bench_kernels_gpu.py --dry-run   # any machine: one tiny size, interpret
                                                       # mode, checks only, writes nothing
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from lampq_jax.kernels import int8_matmul
from lampq_jax.kernels import int8_matmul_reference
from lampq_jax.kernels import quantize_int8_symmetric
from lampq_jax.kernels import weight_only_matmul
from lampq_jax.kernels import weight_only_matmul_reference
from lampq_jax.quant.qtensor import QuantizedTensor

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "kernels_gpu.json"

# Max |kernel - reference| / max |reference| accepted before timing (bf16 output).
_TOLERANCE = 2e-2


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ms", type=int, nargs="+", default=[1, 8, 64, 256])
    parser.add_argument("--k", type=int, default=4096)
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--iters", type=int, default=100)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="one tiny size (M=3, K=N=128) in interpret mode on any backend; "
        "checks shapes and numerics, writes no results",
    )
    args = parser.parse_args(argv)
    if args.dry_run:
        args.ms, args.k, args.n, args.warmup, args.iters = [3], 128, 128, 1, 2
    return args


def _gpu_device():
    try:
        return jax.devices("gpu")[0]
    except RuntimeError:
        return None


def median_seconds(fn, *args, warmup: int, iters: int) -> float:
    """Median wall time of ``fn(*args)`` over ``iters`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _relative_error(out, ref) -> float:
    out, ref = out.astype(jnp.float32), ref.astype(jnp.float32)
    return float(jnp.max(jnp.abs(out - ref)) / jnp.maximum(jnp.max(jnp.abs(ref)), 1e-30))


def make_cases(m: int, k: int, n: int, *, interpret: bool):
    """``{name: (jitted fn, args, reference output, weight bytes)}`` for one M."""
    kx, kw = jax.random.split(jax.random.PRNGKey(m))
    x = jax.random.normal(kx, (m, k), jnp.float32).astype(jnp.bfloat16)
    w = jax.random.normal(kw, (k, n), jnp.float32) * 0.02
    w_bf16 = w.astype(jnp.bfloat16)
    cases = {}

    xla = jax.jit(lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32).astype(jnp.bfloat16))
    cases["xla_bf16"] = (xla, (x, w_bf16), xla(x, w_bf16), w_bf16.size * 2)

    for bits in (4, 8):
        qw = QuantizedTensor.from_float(w, bits)
        fn = jax.jit(lambda x, qw: weight_only_matmul(x, qw, interpret=interpret))
        ref = weight_only_matmul_reference(x, qw)
        cases[f"w{bits}_pallas"] = (fn, (x, qw), ref, qw.nbytes)

    xc, xs = quantize_int8_symmetric(x, axis=1)
    wc, ws = quantize_int8_symmetric(w, axis=0)
    fn = jax.jit(lambda xc, xs, wc, ws: int8_matmul(xc, xs, wc, ws, out_dtype=jnp.bfloat16, interpret=interpret))
    ref = int8_matmul_reference(xc, xs, wc, ws, out_dtype=jnp.bfloat16)
    cases["w8a8_pallas"] = (fn, (xc, xs, wc, ws), ref, wc.size + 4 * ws.size)
    return cases


def run(args) -> list[dict]:
    interpret = bool(args.dry_run)
    rows = []
    for m in args.ms:
        cases = make_cases(m, args.k, args.n, interpret=interpret)
        baseline = None
        for name, (fn, fn_args, ref, weight_bytes) in cases.items():
            out = fn(*fn_args)
            if out.shape != (m, args.n):
                raise RuntimeError(f"{name}: output shape {out.shape}, expected {(m, args.n)}")
            err = _relative_error(out, ref)
            if err > _TOLERANCE:
                raise RuntimeError(f"{name} at M={m}: relative error {err:.3g} > {_TOLERANCE}")
            seconds = median_seconds(fn, *fn_args, warmup=args.warmup, iters=args.iters)
            if name == "xla_bf16":
                baseline = seconds
            rows.append(
                {
                    "m": m,
                    "k": args.k,
                    "n": args.n,
                    "kernel": name,
                    "median_us": seconds * 1e6,
                    "speedup_vs_xla_bf16": baseline / seconds,
                    "weight_bytes": int(weight_bytes),
                    "weight_gb_per_s": weight_bytes / seconds / 1e9,
                    "max_rel_err": err,
                }
            )
    return rows


def markdown_table(rows: list[dict]) -> str:
    lines = [
        "| M | K | N | kernel | median (us) | vs XLA bf16 | weight MB | weight GB/s |",
        "|---:|---:|---:|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['m']} | {r['k']} | {r['n']} | {r['kernel']} | {r['median_us']:.1f} | "
            f"{r['speedup_vs_xla_bf16']:.2f}x | {r['weight_bytes'] / 1e6:.2f} | "
            f"{r['weight_gb_per_s']:.0f} |"
        )
    return "\n".join(lines)


def write_json(path: Path, payload: dict) -> None:
    """Writes atomically: a temporary file in the same folder, then ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(payload, f, indent=2)
    os.replace(tmp, path)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    device = _gpu_device()
    if device is None and not args.dry_run:
        raise SystemExit(
            f"bench_kernels_gpu.py needs a GPU, but JAX sees only {jax.devices()} "
            "(install jax[cuda12] on a GPU machine). Use --dry-run to check the script on CPU."
        )
    rows = run(args)
    print(markdown_table(rows))
    if args.dry_run:
        print("dry run: one tiny size in interpret mode; no results written.")
        return rows
    payload = {
        "device": device.device_kind,
        "jax_version": jax.__version__,
        "warmup": args.warmup,
        "iters": args.iters,
        "timing": "median wall time per call, jit-compiled, block_until_ready after each call",
        "rows": rows,
    }
    write_json(args.out, payload)
    print(f"wrote {args.out}")
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
