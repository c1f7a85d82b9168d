"""Build-and-solve time of the bit-allocation ILP: lampq_jax (highspy) against PuLP + CBC.

Two problems, each item choosing one of the candidate bit-widths {2, 3, 4, 5, 6, 8}:

* ``vit_b``: ViT-B/16, 48 items: per block the qkv group (768·2304 weights), the attention
  projection (768·768), fc1 (768·3072) and fc2 (3072·768), MACs for 197 tokens; average-bits
  budget 4.
* ``layers_5000``: 5,000 items with random weight counts (log-uniform 1e4..1e7) and tokens
  (log-uniform 16..4096, so MACs are not proportional to weights); two budgets, average
  bits ≤ 4 and BOPs ≤ 3.9² · ΣMACs, both binding.

Costs are Ω_i(b) = c_i · 4^-b · u_{i,b}, c_i lognormal, u_{i,b} uniform in [0.8, 1.2]
(the quantization error's variance falls by about 4 per bit).

Solvers, every timing including the model's construction from numpy arrays:

* ``highs``: ``lampq_jax.allocation.allocate_bits(..., solver="highs")``;
* ``pulp_cbc``: PuLP 3 building the same model the ordinary way (``LpVariable.dicts``,
  ``lpSum`` per constraint), solved by the CBC binary that PuLP ships
  (``PULP_CBC_CMD(gapRel=...)``), including PuLP's file writing and reading;
* ``scipy``: ``allocate_bits(..., solver="scipy")`` (``scipy.optimize.milp``), the fallback;
* ``highs_bnb``: the same sparse model given to highspy's branch and bound directly, without
  ``allocate_bits``' LP-first step (which returns the rounded LP solution when the LP bound
  already certifies it within the gap): shows how much of the speed comes from that step.

All with the same relative MIP gap (1e-4); the median of ``--repeats`` runs is reported.
The objectives must agree to within the gap, and every solution is checked against the
budgets. Writes a section of ``benchmarks/RESULTS.md`` and ``benchmarks/results/ilp_speed.json``.

Usage:
    .venv/bin/python benchmarks/bench_ilp.py            # needs `pip install pulp`
    .venv/bin/python benchmarks/bench_ilp.py --repeats 1 --no-scipy --no-bnb
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pulp

from lampq_jax.allocation import Budget, allocate_bits, bops_budget, budget_usage
from lampq_jax.allocation import ilp

HERE = Path(__file__).resolve().parent
RESULTS_MD = HERE / "RESULTS.md"
RESULTS_JSON = HERE / "results" / "ilp_speed.json"
START, END = "<!-- bench_ilp:start -->", "<!-- bench_ilp:end -->"
BITS = np.array([2, 3, 4, 5, 6, 8])
MIP_GAP = 1e-4
TIME_LIMIT = 300.0


def vit_b_problem(seed: int = 0) -> dict:
    """48 items of ViT-B/16: (qkv, proj, fc1, fc2) × 12 blocks, 197 tokens, avg bits ≤ 4."""
    rng = np.random.default_rng(seed)
    d, mlp, tokens = 768, 3072, 197
    per_block = np.array([d * 3 * d, d * d, d * mlp, mlp * d])
    num_weights = np.tile(per_block, 12)
    macs = tokens * num_weights
    cost = rng.lognormal(size=(48, 1)) * num_weights[:, None] * 4.0**-BITS
    cost *= rng.uniform(0.8, 1.2, size=cost.shape)
    return dict(cost=cost, num_weights=num_weights, macs=macs, budget=Budget(avg_bits=4.0))


def many_layers_problem(n: int = 5000, seed: int = 0) -> dict:
    """`n` random items; avg bits ≤ 4 and BOPs ≤ 3.9² ΣMACs."""
    rng = np.random.default_rng(seed)
    num_weights = np.round(10 ** rng.uniform(4, 7, n))
    macs = num_weights * np.round(10 ** rng.uniform(np.log10(16), np.log10(4096), n))
    cost = rng.lognormal(size=(n, 1)) * 4.0**-BITS * rng.uniform(0.8, 1.2, size=(n, BITS.size))
    budget = Budget(avg_bits=4.0, bops=bops_budget(macs, 3.9))
    return dict(cost=cost, num_weights=num_weights, macs=macs, budget=budget)


def solve_lampq(problem: dict, solver: str) -> tuple[float, np.ndarray]:
    """(objective, chosen bits [n]) with lampq_jax's allocate_bits."""
    result = allocate_bits(
        problem["cost"],
        BITS,
        num_weights=problem["num_weights"],
        macs=problem["macs"],
        budget=problem["budget"],
        mip_gap=MIP_GAP,
        time_limit=TIME_LIMIT,
        solver=solver,
    )
    if result.status != "optimal":
        raise RuntimeError(f"{solver}: status {result.status}")
    return result.objective, result.weight_bits


def solve_highs_bnb(problem: dict) -> tuple[float, np.ndarray]:
    """(objective, chosen bits [n]) from highspy's branch and bound on lampq_jax's sparse model."""
    n, m = problem["cost"].shape
    options = ilp._validate_options(n, m, BITS, None, problem["num_weights"], None, problem["macs"], None, None)
    rows = ilp._budget_rows(options, problem["budget"])
    model = ilp._sparse_model(problem["cost"], options.allowed, rows)
    h = ilp._highs_with_model(model, integer=True, time_limit=TIME_LIMIT, mip_gap=MIP_GAP)
    h.run()
    if h.getModelStatus().name != "kOptimal":
        raise RuntimeError(f"highs_bnb: status {h.getModelStatus().name}")
    x = np.asarray(h.getSolution().col_value)
    choice = ilp._dense(x, model, n, m, -np.inf).argmax(axis=1)
    return float(problem["cost"][np.arange(n), choice].sum()), BITS[choice]


def solve_pulp_cbc(problem: dict) -> tuple[float, np.ndarray]:
    """(objective, chosen bits [n]) with the model written the ordinary PuLP way, solved by CBC."""
    cost = problem["cost"].tolist()
    num_weights, macs = problem["num_weights"].tolist(), problem["macs"].tolist()
    bits = BITS.tolist()
    n, m = len(cost), len(bits)
    budget = problem["budget"]
    prob = pulp.LpProblem("bit_allocation", pulp.LpMinimize)
    x = pulp.LpVariable.dicts("x", (range(n), range(m)), cat="Binary")
    prob += pulp.lpSum(cost[i][j] * x[i][j] for i in range(n) for j in range(m))
    for i in range(n):
        prob += pulp.lpSum(x[i][j] for j in range(m)) == 1
    if budget.avg_bits is not None:
        prob += pulp.lpSum(
            num_weights[i] * bits[j] * x[i][j] for i in range(n) for j in range(m)
        ) <= budget.avg_bits * sum(num_weights)
    if budget.bops is not None:
        prob += pulp.lpSum(macs[i] * bits[j] * bits[j] * x[i][j] for i in range(n) for j in range(m)) <= budget.bops
    status = prob.solve(pulp.PULP_CBC_CMD(msg=False, gapRel=MIP_GAP, timeLimit=TIME_LIMIT))
    if pulp.LpStatus[status] != "Optimal":
        raise RuntimeError(f"CBC: status {pulp.LpStatus[status]}")
    choice = np.array([max(range(m), key=lambda j: x[i][j].varValue) for i in range(n)])
    return float(pulp.value(prob.objective)), BITS[choice]


def check_budget(problem: dict, bits: np.ndarray, who: str) -> dict:
    """What a solution spends; raises when it exceeds a budget by more than 1e-6 relative."""
    use = budget_usage(bits, num_weights=problem["num_weights"], macs=problem["macs"])
    spent = {}
    for kind, limit in problem["budget"].limits().items():
        spent[kind] = getattr(use, kind) / limit
        if spent[kind] > 1 + 1e-6:
            raise RuntimeError(f"{who} exceeds {kind}: {getattr(use, kind)!r} > {limit!r}")
    return spent


def time_solver(fn, repeats: int) -> tuple[float, float, np.ndarray]:
    """(median seconds, objective, bits) over `repeats` runs of fn() → (objective, bits)."""
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        objective, bits = fn()
        times.append(time.perf_counter() - began)
    return statistics.median(times), objective, bits


def run_problem(name: str, problem: dict, repeats: int, with_scipy: bool, with_bnb: bool) -> dict:
    solvers = {
        "highs": lambda: solve_lampq(problem, "highs"),
        "pulp_cbc": lambda: solve_pulp_cbc(problem),
    }
    if with_scipy:
        solvers["scipy"] = lambda: solve_lampq(problem, "scipy")
    if with_bnb:
        solvers["highs_bnb"] = lambda: solve_highs_bnb(problem)
    out = {}
    for key, fn in solvers.items():
        seconds, objective, bits = time_solver(fn, repeats)
        spent = check_budget(problem, bits, key)
        out[f"{key}_s"] = seconds
        out[f"{key}_objective"] = objective
        out[f"{key}_budget_spent"] = spent
        print(f"{name:12s} {key:9s} {seconds:8.3f} s  objective {objective:.10g}  spent {spent}", flush=True)
    out["speedup_vs_pulp_cbc"] = out["pulp_cbc_s"] / out["highs_s"]
    ref = out["highs_objective"]
    for key in solvers:
        rel = abs(out[f"{key}_objective"] - ref) / abs(ref)
        if rel > MIP_GAP + 1e-9:
            raise RuntimeError(f"{name}: {key} objective differs from highs by {rel:.2e}")
    out["max_relative_objective_difference"] = max(abs(out[f"{key}_objective"] - ref) / abs(ref) for key in solvers)
    out["items"] = int(problem["cost"].shape[0])
    out["options"] = int(problem["cost"].shape[1])
    out["budget"] = problem["budget"].limits()
    return out


def machine() -> dict:
    cpu = "unknown"
    try:
        match = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
        cpu = match.group(1).strip() if match else cpu
    except OSError:
        pass
    versions = {k: importlib.metadata.version(k) for k in ("highspy", "numpy", "scipy", "pulp")}
    return dict(
        date=subprocess.run(["date", "-u"], capture_output=True, text=True).stdout.strip(),
        cores=subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip(),
        cpu=cpu,
        load=" ".join(f"{v:.1f}" for v in os.getloadavg()),
        python=platform.python_version(),
        **versions,
    )


def markdown(results: dict, info: dict, command: str) -> str:
    lines = [
        START,
        "## Bit-allocation ILP: build + solve time (`benchmarks/bench_ilp.py`)",
        "",
        f"Command: `{command}`  ",
        f"Date: {info['date']}  ",
        f"Machine: {info['cores']} cores ({info['cpu']}), load average at start {info['load']} "
        "(a shared machine: absolute times are noisy, the ratios come from one run)  ",
        f"Versions: Python {info['python']}, highspy {info['highspy']}, numpy {info['numpy']}, "
        f"scipy {info['scipy']}, PuLP {info['pulp']} (its bundled CBC)",
        "",
        f"Candidates {{2, 3, 4, 5, 6, 8}} bits, relative MIP gap {MIP_GAP:g} for every solver; "
        "times include building the model; median of the repeats.",
        "",
        "| problem | budgets | lampq_jax + highspy (s) | PuLP + CBC (s) | speed-up "
        "| scipy.milp fallback (s) | highspy B&B only (s) | objective highspy | objective CBC |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in results.items():
        scipy_s = f"{r['scipy_s']:.3f}" if "scipy_s" in r else "–"
        bnb_s = f"{r['highs_bnb_s']:.3f}" if "highs_bnb_s" in r else "–"
        budgets = ", ".join(f"{k} ≤ {v:.4g}" for k, v in r["budget"].items())
        lines.append(
            f"| {name} ({r['items']} × {r['options']}) | {budgets} | {r['highs_s']:.3f} | "
            f"{r['pulp_cbc_s']:.3f} | {r['speedup_vs_pulp_cbc']:.1f}× | {scipy_s} | {bnb_s} | "
            f"{r['highs_objective']:.8g} | {r['pulp_cbc_objective']:.8g} |"
        )
    lines += [
        "",
        "lampq_jax first solves the LP relaxation and returns its rounded, greedily improved "
        "solution when the LP bound already certifies it within the gap; only otherwise does it "
        "run HiGHS's branch and bound (started from that solution). The column *highspy B&B "
        "only* gives the same sparse model straight to HiGHS's branch and bound: most of the "
        "speed-up at many items comes from the LP-first step, not from HiGHS being faster "
        "than CBC. Every solution was checked against the budgets.",
        "",
        END,
    ]
    return "\n".join(lines)


def write_section(section: str) -> None:
    """Replaces this benchmark's section of RESULTS.md (or appends it), leaving the rest."""
    text = RESULTS_MD.read_text() if RESULTS_MD.exists() else "# Benchmark results\n"
    if START in text and END in text:
        head, rest = text.split(START, 1)
        text = head + section + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    RESULTS_MD.write_text(text)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-scipy", action="store_true", help="skip the scipy.optimize.milp fallback")
    parser.add_argument("--no-bnb", action="store_true", help="skip highspy's plain branch and bound")
    parser.add_argument("--no-write", action="store_true", help="print only; write no results")
    args = parser.parse_args(argv)
    info = machine()
    print(f"{info['date']}; {info['cores']} cores, {info['cpu']}; load {info['load']}", flush=True)
    results = {
        name: run_problem(name, problem, args.repeats, not args.no_scipy, not args.no_bnb)
        for name, problem in (("vit_b", vit_b_problem()), ("layers_5000", many_layers_problem()))
    }
    flags = argv if argv is not None else sys.argv[1:]
    command = " ".join([".venv/bin/python benchmarks/bench_ilp.py", *flags])
    section = markdown(results, info, command.strip())
    print(section)
    if not args.no_write:
        RESULTS_JSON.parent.mkdir(parents=True, exist_ok=True)
        RESULTS_JSON.write_text(json.dumps(results, indent=2) + "\n")
        write_section(section)


if __name__ == "__main__":
    main()
