"""The CLI's persistent compilation cache: a first run (empty cache) against a second one.

Each run is a fresh process, as two `lampq quantize` runs are: it turns the cache on the way the CLI does
(`lampq_jax.cli.use_compile_cache`), then times `quantize_uniform` at 4 bits and LampQ (defaults) at 4MP with
32 calibration images: on DINOv2-S/14 (cosine objective, features; `--model dinov2`) or on the embedded
Fashion-MNIST ViT (`--model embedded`). The two runs share only the cache folder; a third run with the cache
off gives the process's time without it.

    python benchmarks/bench_compile_cache.py [--model dinov2|embedded]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_json, write_section  # noqa: E402

RUNS = (("cache off", "off"), ("first run, empty cache", "cache"), ("second run, same cache", "cache"))


def one_run(cache: str, which: str) -> dict:
    """Seconds of model loading, uniform and LampQ in this process, with jax's cache in `cache` ('off': none)."""
    start = time.perf_counter()
    import lampq_jax
    from lampq_jax.cli import compile_cache_dir, use_compile_cache

    use_compile_cache(compile_cache_dir(cache))
    if which == "dinov2":
        from lampq_jax.data.photos import photo_crops
        from lampq_jax.models.dinov2_onnx import load_dinov2_s14, normalize_imagenet

        model, variables = load_dinov2_s14()
        calib = normalize_imagenet(photo_crops("calibration", 32, 224, seed=0))
        config, objective = lampq_jax.LampQConfig(output="features", progress=False), "cosine"
    else:
        from lampq_jax.data.embedded import load_embedded_model, load_embedded_subset

        model, variables, _ = load_embedded_model()
        calib = load_embedded_subset()["calib_images"][:32]
        config, objective = lampq_jax.LampQConfig(progress=False), None
    seconds = {"load": time.perf_counter() - start}
    start = time.perf_counter()
    lampq_jax.quantize_uniform(model, variables, calib, 4, train=False)
    seconds["uniform"] = time.perf_counter() - start
    start = time.perf_counter()
    result = lampq_jax.quantize(model, variables, calib, budget=4.0, objective=objective, config=config, train=False)
    seconds["lampq"] = time.perf_counter() - start
    return {"seconds": seconds, "timings": {k: round(v, 1) for k, v in result.timings.items()}}


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--one-run":
        print(json.dumps(one_run(sys.argv[2], sys.argv[3])))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("dinov2", "embedded"), default="dinov2")
    which = parser.parse_args().model
    start_all = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for label, cache in RUNS:
            where = "off" if cache == "off" else str(Path(folder) / "xla")
            command = [sys.executable, __file__, "--one-run", where, which]
            out = subprocess.run(command, capture_output=True, text=True)
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
    title = "DINOv2-S/14, 32 calibration crops" if which == "dinov2" else "embedded Fashion-MNIST ViT, 32 images"
    body = (
        f"## Persistent compilation cache of the `lampq` command ({title})\n\n"
        "Seconds of three fresh processes in a row: the cache off, then twice with one cache folder "
        "(`lampq_jax.cli.use_compile_cache`, what `lampq --compile-cache DIR` does). Each runs "
        "`quantize_uniform` at 4 bits, then LampQ at 4MP with the default options"
        + (" (cosine objective, features)" if which == "dinov2" else "")
        + ".\n\n"
        + "\n".join(lines)
        + f"\n\nWhole run: {total:.0f} s."
    )
    suffix = "" if which == "dinov2" else "_embedded"
    write_section(f"bench_compile_cache{suffix}", body, f"python benchmarks/bench_compile_cache.py --model {which}")
    write_json(f"compile_cache{suffix}.json", {"rows": rows, "seconds": total})


if __name__ == "__main__":
    main()
