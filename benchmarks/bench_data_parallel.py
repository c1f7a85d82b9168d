"""Data-parallel LampQ on fake CPU devices: the same bits and outputs as one device, and what sharding costs.

One process with `--devices` fake CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count, set here
before jax starts) runs LampQ on the embedded ViT (`--calib` calibration images, 4 average bits) with a
mesh of its first device and with a mesh of all of them, alternately, `--repeats` times each. The first run
of each compiles; the table gives the median of the later ones by stage (`result.timings`). Fake devices
share this machine's cores, so the ratio is the overhead of sharding (partitioned programs, collectives,
padding), not a speed-up: real scaling needs real devices.

    python benchmarks/bench_data_parallel.py [--devices 4] [--calib 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import sys


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--devices", type=int, default=4)
    parser.add_argument("--calib", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    return parser.parse_args()


ARGS = parse_args()
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={ARGS.devices}"

import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_json, write_section  # noqa: E402

import lampq_jax  # noqa: E402
from lampq_jax.data.embedded import load_embedded_model, load_embedded_subset  # noqa: E402
from lampq_jax.report import accuracy, markdown_table  # noqa: E402

STAGES = ("calibration", "fisher", "metric", "probe", "ilp", "evaluate", "iterations")


def main() -> None:
    assert jax.device_count() == ARGS.devices, jax.devices()
    model, variables, _ = load_embedded_model()
    data = load_embedded_subset()
    calib = data["calib_images"][: ARGS.calib]
    test_x, test_y = data["test_images"], data["test_labels"]
    config = lampq_jax.LampQConfig(progress=False)
    meshes = {"1 device": lampq_jax.data_mesh(jax.devices()[:1]), f"{ARGS.devices} devices": lampq_jax.data_mesh()}
    runs: dict[str, list[dict]] = {name: [] for name in meshes}
    results = {}
    for _ in range(ARGS.repeats + 1):
        for name, mesh in meshes.items():
            start = time.perf_counter()
            result = lampq_jax.quantize(model, variables, calib, budget=4.0, config=config, mesh=mesh, train=False)
            runs[name].append({**result.timings, "total": time.perf_counter() - start})
            results[name] = result
            print(name, {k: round(v, 2) for k, v in runs[name][-1].items()}, flush=True)
    one, many = (results[n] for n in meshes)
    fisher_rel = max(
        abs(a["fisher_w"] - b["fisher_w"]) / abs(b["fisher_w"])
        for a, b in zip(many.report["layers"], one.report["layers"])
    )
    acc = {
        n: accuracy(lambda x, r=r: r.apply(x, train=False), test_x, test_y, mesh=meshes[n]) for n, r in results.items()
    }
    rows = []
    for stage in STAGES + ("total",):
        cold = [runs[n][0].get(stage, 0.0) for n in meshes]
        warm = [statistics.median(r.get(stage, 0.0) for r in runs[n][1:]) for n in meshes]
        rows.append(
            [
                stage,
                f"{cold[0]:.2f}",
                f"{cold[1]:.2f}",
                f"{warm[0]:.2f}",
                f"{warm[1]:.2f}",
                f"{warm[1] / warm[0]:.2f}" if warm[0] > 0.005 else "–",
            ]
        )
    names = list(meshes)
    body = "\n".join(
        [
            "## Data-parallel LampQ on fake CPU devices (`bench_data_parallel.py`)",
            "",
            f"LampQ at 4 average bits on the embedded ViT, {ARGS.calib} calibration images, default config. Seconds by "
            f"stage: the first run (compiles) and the median of {ARGS.repeats} later runs; both meshes in one process "
            f"with {ARGS.devices} fake CPU devices on {os.cpu_count()} cores. Fake devices share the cores, so the "
            "ratio is the overhead of sharding, not a speed-up; real scaling needs real devices.",
            "",
            markdown_table(
                [
                    "stage",
                    f"{names[0]}, first",
                    f"{names[1]}, first",
                    f"{names[0]}, median",
                    f"{names[1]}, median",
                    "ratio",
                ],
                rows,
            ),
            "",
            f"Same bits: {one.bits == many.bits}; same J: {one.report['J']:.6g} vs {many.report['J']:.6g}; "
            f"weight Fisher traces: max relative difference {fisher_rel:.1e}; test accuracy (2,000 embedded images) "
            f"{acc[names[0]]:.2f} vs {acc[names[1]]:.2f}.",
        ]
    )
    write_section("bench_data_parallel", body, "python benchmarks/bench_data_parallel.py " + " ".join(sys.argv[1:]))
    write_json(
        "bench_data_parallel.json",
        {
            "runs": runs,
            "same_bits": one.bits == many.bits,
            "J": [one.report["J"], many.report["J"]],
            "fisher_w_max_rel": fisher_rel,
            "accuracy": acc,
        },
    )
    print(body)


if __name__ == "__main__":
    main()
