"""Shared helpers of the benchmarks: machine description, timing, and writing RESULTS.md sections."""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np

ROOT = Path(__file__).resolve().parent
RESULTS_MD = ROOT / "RESULTS.md"
RESULTS_DIR = ROOT / "results"


def cpu_model() -> str:
    """This machine's CPU model (/proc/cpuinfo's 'model name', else what `platform` says)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> str:
    """'N cores, CPU model, jax version, backend' of this machine."""
    return f"{os.cpu_count()} cores, {cpu_model()}, jax {jax.__version__} ({jax.default_backend()})"


def interleaved_medians(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Median seconds of each fn, timed in alternation (so load changes hit all of them alike)."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(fn())
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def batched(fn: Callable[[Any], Any], images: Any, batch: int) -> np.ndarray:
    """fn's outputs on `images`, `batch` at a time, concatenated as a numpy array."""
    return np.concatenate([np.asarray(fn(images[i : i + batch])) for i in range(0, len(images), batch)])


def write_section(name: str, body: str, command: str) -> None:
    """Replaces (or appends) the section `name` of benchmarks/RESULTS.md, stamped with command, date, machine."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    section = (
        f"<!-- {name}:start -->\n{body.strip()}\n\n"
        f"Command: `{command}`; date: {stamp}; machine: {machine()}.\n<!-- {name}:end -->"
    )
    text = RESULTS_MD.read_text() if RESULTS_MD.exists() else "# Benchmark results\n"
    pattern = re.compile(rf"<!-- {re.escape(name)}:start -->.*?<!-- {re.escape(name)}:end -->", re.S)
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else text.rstrip() + "\n\n" + section + "\n"
    tmp = RESULTS_MD.with_suffix(".md.tmp")
    tmp.write_text(text)
    os.replace(tmp, RESULTS_MD)


def write_json(filename: str, data: dict[str, Any]) -> None:
    """Writes benchmarks/results/<filename> atomically."""
    RESULTS_DIR.mkdir(exist_ok=True)
    path = RESULTS_DIR / filename
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def write_results(section: str, heading: str, lines: list[str], start: float, data: dict[str, Any]) -> float:
    """Writes RESULTS.md's `section`: `heading` (title and intro), the table `lines` and the whole run's seconds
    since `start`; and results/<section without 'bench_'>.json: `data` with those seconds. Returns the seconds."""
    total = time.perf_counter() - start
    write_section(
        section, heading + "\n".join(lines) + f"\n\nWhole run: {total:.0f} s.", f"python benchmarks/{section}.py"
    )
    write_json(f"{section.removeprefix('bench_')}.json", {**data, "seconds": total})
    return total
