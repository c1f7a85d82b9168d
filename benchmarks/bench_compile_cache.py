"""The CLI's persistent compilation cache on the real ViT: a first run (empty cache) against a second one.

Each run is a fresh process, as two `lampq quantize` runs are: it turns the cache on the way the CLI does
(`lampq_jax.cli.use_compile_cache`), then times `quantize_uniform` at 4 bits and LampQ (defaults, cosine
objective, features) at 4MP on DINOv2-S/14 with 32 calibration crops. The two runs share only the cache
folder; a third run with the cache off gives the process's time without it.

    python benchmarks/bench_compile_cache.py
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_json, write_section  # noqa: E402

RUNS = (("cache off", "off"), ("first run, empty cache", "cache"), ("second run, same cache", "cache"))


def one_run(cache: str) -> dict:
    """Seconds of model loading, uniform and LampQ in this process, with jax's cache in `cache` ('off': none)."""
    start = time.perf_counter()
    import lampq_jax
    from lampq_jax.cli import compile_cache_dir, use_compile_cache
    from lampq_jax.data.photos import photo_crops
    from lampq_jax.models.dinov2_onnx import load_dinov2_s14, normalize_imagenet

    use_compile_cache(compile_cache_dir(cache))
    model, variables = load_dinov2_s14()
    calib = normalize_imagenet(photo_crops("calibration", 32, 224, seed=0))
    seconds = {"load": time.perf_counter() - start}
    start = time.perf_counter()
    lampq_jax.quantize_uniform(model, variables, calib, 4, train=False)
    seconds["uniform"] = time.perf_counter() - start
    config = lampq_jax.LampQConfig(output="features", progress=False)
    start = time.perf_counter()
    result = lampq_jax.quantize(model, variables, calib, budget=4.0, objective="cosine", config=config, train=False)
    seconds["lampq"] = time.perf_counter() - start
    return {"seconds": seconds, "timings": {k: round(v, 1) for k, v in result.timings.items()}}


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--one-run":
        print(json.dumps(one_run(sys.argv[2])))
        return
    start_all = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for label, cache in RUNS:
            where = "off" if cache == "off" else str(Path(folder) / "xla")
            out = subprocess.run([sys.executable, __file__, "--one-run", where], capture_output=True, text=True)
            if out.returncode:
                raise RuntimeError(f"run {label!r} failed:\n{out.stderr[-3000:]}")
            rows.append({"run": label, **json.loads(out.stdout.strip().splitlines()[-1])})
            print(rows[-1], flush=True)
    lines = [
        "| run | model + crops loaded | uniform W4A4 | LampQ 4MP | LampQ's Fisher | LampQ's probes | LampQ / uniform |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        s, t = r["seconds"], r["timings"]
        lines.append(
            f"| {r['run']} | {s['load']:.0f} | {s['uniform']:.0f} | {s['lampq']:.0f} | {t['fisher']:.0f} "
            f"| {t['probe']:.0f} | {s['lampq'] / s['uniform']:.1f} |"
        )
    total = time.perf_counter() - start_all
    body = (
        "## Persistent compilation cache of the `lampq` command (DINOv2-S/14, 32 calibration crops)\n\n"
        "Seconds of three fresh processes in a row: the cache off, then twice with one cache folder "
        "(`lampq_jax.cli.use_compile_cache`, what `lampq` does unless `--compile-cache off`). Each runs "
        "`quantize_uniform` at 4 bits, then LampQ at 4MP with the default options (cosine objective, features).\n\n"
        + "\n".join(lines)
        + f"\n\nWhole run: {total:.0f} s."
    )
    write_section("bench_compile_cache", body, "python benchmarks/bench_compile_cache.py")
    write_json("compile_cache.json", {"rows": rows, "seconds": total})


if __name__ == "__main__":
    main()
