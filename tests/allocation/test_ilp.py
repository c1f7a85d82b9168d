"""The bit-allocation ILP: exact against brute force, budgets, masks, errors."""

import itertools
import re

import numpy as np
import pytest

from lampq_jax.allocation import ilp
from lampq_jax.allocation import (
    AllocationResult,
    Budget,
    allocate_bits,
    bops_budget,
    budget_usage,
    smallest_feasible_budget,
)

KINDS = ("avg_bits", "avg_act_bits", "model_bytes", "bops")
SEEDS = range(25)


def random_problem(seed, separate_wa=None):
    """Up to 6 items × 3 options with integer counts; W/A pairs on odd seeds."""
    rng = np.random.default_rng(seed)
    n, m = int(rng.integers(1, 7)), int(rng.integers(1, 4))
    separate = seed % 2 == 1 if separate_wa is None else separate_wa
    weight_bits = np.sort(rng.choice([2, 3, 4, 5, 6, 8], size=(n, m)), axis=1)
    allowed = rng.uniform(size=(n, m)) < 0.7
    allowed[np.arange(n), rng.integers(0, m, n)] = True
    act_bits = rng.choice([4, 6, 8], size=(n, m)) if separate else weight_bits
    return dict(
        cost=rng.uniform(0.0, 1.0, size=(n, m)),
        weight_bits=weight_bits,
        act_bits=act_bits,
        num_weights=rng.integers(1, 1000, size=n),
        num_activations=rng.integers(1, 1000, size=n),
        macs=rng.integers(1, 10_000, size=n),
        scale_bytes=rng.integers(0, 50, size=n),
        allowed=allowed if seed % 3 == 0 else None,
    )


def counts(p):
    return {k: p[k] for k in ("num_weights", "num_activations", "macs", "scale_bytes")}


def all_assignments(p):
    """[m^n, n] every assignment that respects `allowed`."""
    n, m = p["cost"].shape
    grid = np.array(list(itertools.product(range(m), repeat=n)))
    if p["allowed"] is not None:
        grid = grid[p["allowed"][np.arange(n), grid].all(axis=1)]
    return grid


def usage_of(p, grid):
    """{kind: [num_assignments]} what every assignment spends, in budget units."""
    items = np.arange(p["cost"].shape[0])
    wb, ab = p["weight_bits"][items, grid], p["act_bits"][items, grid]
    nw, na = p["num_weights"], p["num_activations"]
    return {
        "avg_bits": (nw * wb).sum(1) / nw.sum(),
        "avg_act_bits": (na * ab).sum(1) / na.sum(),
        "model_bytes": (nw * wb / 8 + p["scale_bytes"]).sum(1),
        "bops": (p["macs"] * wb * ab).sum(1),
    }


def random_budget(p, kinds, rng):
    """A budget between the cheapest and the dearest assignment in every kind."""
    use = usage_of(p, all_assignments(p))
    return Budget(**{k: float(use[k].min() + rng.uniform() * np.ptp(use[k])) + 1e-9 for k in kinds})


def brute_force(p, budget):
    """The least total cost over every assignment within `budget`, or None."""
    grid = all_assignments(p)
    ok = np.ones(len(grid), dtype=bool)
    for kind, value in budget.limits().items():
        ok &= usage_of(p, grid)[kind] <= value
    if not ok.any():
        return None
    return p["cost"][np.arange(p["cost"].shape[0]), grid[ok]].sum(axis=1).min()


def solve(p, budget, **kw):
    kw.setdefault("mip_gap", 0.0)
    return allocate_bits(
        p["cost"],
        p["weight_bits"],
        p["act_bits"],
        budget=budget,
        allowed=p["allowed"],
        **counts(p),
        **kw,
    )


def assert_within(p, result, budget):
    use = budget_usage(result.weight_bits, result.act_bits, **counts(p))
    for kind, value in budget.limits().items():
        assert getattr(use, kind) <= value * (1 + 1e-9), (kind, getattr(use, kind), value)


@pytest.mark.parametrize("solver", ["highs", "scipy"])
@pytest.mark.parametrize("kinds", [(k,) for k in KINDS] + [KINDS], ids=[*KINDS, "all"])
def test_matches_brute_force(kinds, solver):
    rng = np.random.default_rng(123)
    for seed in SEEDS:
        p = random_problem(seed)
        budget = random_budget(p, kinds, rng)
        best = brute_force(p, budget)
        if best is None:  # combined budgets can be infeasible together
            with pytest.raises(ValueError, match="infeasible"):
                solve(p, budget, solver=solver)
            continue
        result = solve(p, budget, solver=solver)
        assert result.objective == pytest.approx(best, abs=1e-6), (seed, kinds)
        assert result.status == "optimal" and result.solver == solver
        assert_within(p, result, budget)
        if p["allowed"] is not None:
            assert p["allowed"][np.arange(len(result.choice)), result.choice].all()


def test_tiny_costs_are_solved_exactly():
    """Ω of order 1e-12 (Fisher-weighted errors can be) must not stop the search early."""
    rng = np.random.default_rng(7)
    for seed in range(10):
        p = random_problem(seed, separate_wa=False)
        p["cost"] = p["cost"] * 1e-12
        budget = random_budget(p, ("avg_bits",), rng)
        best = brute_force(p, budget)
        assert solve(p, budget, mip_gap=1e-6).objective == pytest.approx(best, rel=1e-5)


def test_result_fields():
    bits = np.array([2, 4, 8])
    cost = np.array([[4.0, 2.0, 1.0], [8.0, 3.0, 0.0]])
    # Within 5 bits on average: (4, 4) costs 5, (2, 8) costs 4, (8, 2) costs 9.
    result = allocate_bits(cost, bits, num_weights=[100, 100], budget=Budget(avg_bits=5.0))
    assert isinstance(result, AllocationResult)
    np.testing.assert_array_equal(result.choice, [0, 2])
    assert result.objective == 4.0 and list(result.weight_bits) == [2, 8]
    np.testing.assert_array_equal(result.act_bits, result.weight_bits)
    assert result.solver == "highs" and result.status == "optimal" and result.mip_gap <= 1e-9
    assert result.choice.shape == (2,) and np.issubdtype(result.choice.dtype, np.integer)
    assert result.solve_seconds > 0


def test_separate_weight_and_activation_pairs():
    # Options (w, a): (4, 4), (4, 8), (8, 8), (8, 4). Costs favour high activation bits.
    wb, ab = np.array([4, 4, 8, 8]), np.array([4, 8, 8, 4])
    cost = np.tile([[3.0, 1.0, 0.0, 2.0]], (3, 1))
    nw, na = np.array([10, 10, 10]), np.array([5, 5, 5])
    result = allocate_bits(
        cost, wb, ab, num_weights=nw, num_activations=na, budget=Budget(avg_bits=4.0, avg_act_bits=8.0)
    )
    np.testing.assert_array_equal(result.weight_bits, 4)
    np.testing.assert_array_equal(result.act_bits, 8)
    result = allocate_bits(
        cost, wb, ab, num_weights=nw, num_activations=na, budget=Budget(avg_bits=8.0, avg_act_bits=4.0)
    )
    np.testing.assert_array_equal(result.act_bits, 4)
    assert result.objective == 6.0  # (8, 4) at 2 each


def test_allowed_mask_fixes_items():
    rng = np.random.default_rng(0)
    n, bits = 40, np.array([2, 3, 4, 5, 6, 8])
    cost = rng.lognormal(size=(n, 1)) * 4.0**-bits
    allowed = np.ones((n, 6), dtype=bool)
    allowed[0] = bits == 8  # fixed by the user
    allowed[1] = bits == 2
    allowed[2:10] = bits >= 4  # a per-type minimum
    allowed[10:20] = bits <= 5  # a per-type maximum
    cost[~allowed] = np.nan  # ignored where not allowed
    for solver in ("highs", "scipy"):
        result = allocate_bits(
            cost,
            bits,
            num_weights=rng.integers(100, 1000, n),
            budget=Budget(avg_bits=4.0),
            allowed=allowed,
            solver=solver,
        )
        assert result.weight_bits[0] == 8 and result.weight_bits[1] == 2
        assert (result.weight_bits[2:10] >= 4).all() and (result.weight_bits[10:20] <= 5).all()


def test_budgets_met_and_gap_on_a_larger_problem():
    rng = np.random.default_rng(1)
    n, bits = 60, np.array([2, 3, 4, 5, 6, 8])
    cost = rng.lognormal(size=(n, 1)) * 4.0**-bits * rng.uniform(0.5, 1.5, size=(n, 6))
    nw, macs, scales = rng.integers(10_000, 1_000_000, n), rng.integers(10**6, 10**8, n), np.full(n, 64)
    budget = Budget(avg_bits=4.0, bops=bops_budget(macs, 4.0), model_bytes=float(nw.sum() * 4.2 / 8))
    counts = dict(num_weights=nw, macs=macs, scale_bytes=scales)
    result = allocate_bits(cost, bits, budget=budget, **counts)
    assert result.status == "optimal" and result.mip_gap <= 1e-4
    use = budget_usage(result.weight_bits, **counts)
    assert use.avg_bits <= 4.0 and use.bops <= budget.bops and use.model_bytes <= budget.model_bytes
    exact = allocate_bits(cost, bits, budget=budget, mip_gap=0.0, **counts)
    assert exact.objective <= result.objective <= exact.objective * (1 + 1e-4)


def test_many_items_take_the_lp_shortcut(monkeypatch):
    """With thousands of items the rounded LP solution is within the gap: no branch and bound."""
    built = []
    original = ilp._highs_with_model

    def spy(*args, **kwargs):
        built.append(kwargs["integer"])
        return original(*args, **kwargs)

    monkeypatch.setattr(ilp, "_highs_with_model", spy)
    rng = np.random.default_rng(2)
    n, bits = 3000, np.array([2, 3, 4, 5, 6, 8])
    cost = rng.lognormal(size=(n, 1)) * 4.0**-bits
    nw = rng.integers(10_000, 1_000_000, n)
    result = allocate_bits(cost, bits, num_weights=nw, budget=Budget(avg_bits=4.0))
    assert result.status == "optimal" and result.mip_gap <= 1e-4
    assert budget_usage(result.weight_bits, num_weights=nw).avg_bits <= 4.0
    assert result.solve_seconds < 10.0  # ~0.2 s alone on a laptop core; loose for shared CI
    assert built == [False]  # the LP relaxation only


def test_zero_budget_keeps_only_options_that_spend_none():
    # Items 0 and 1 run no matmuls (MACs 0): BOPs ≤ 0 forbids nothing there but all of item 2.
    cost = np.array([[3.0, 2.0, 1.0], [1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    with pytest.raises(ValueError, match="budget bops=0.0 is infeasible"):
        allocate_bits(cost, [2, 4, 8], num_weights=[1, 1, 1], macs=[0, 0, 5], budget=Budget(bops=0.0))
    result = allocate_bits(cost[:2], [2, 4, 8], num_weights=[1, 1], macs=[0, 0], budget=Budget(bops=0.0))
    np.testing.assert_array_equal(result.weight_bits, [8, 2])
    low = smallest_feasible_budget([2, 4], num_weights=[0, 0], macs=[0, 0])
    assert low == Budget(model_bytes=0.0, bops=0.0)


def test_highs_is_silent(capfd):
    allocate_bits([[1.0, 0.0]], [4, 8], num_weights=[1], budget=Budget(avg_bits=8.0), solver="highs")
    out, err = capfd.readouterr()
    assert out == "" and err == ""


def first_number(message, after):
    return float(re.search(after + r" ([0-9.e+]+)", message).group(1))


def test_infeasible_budget_states_smallest_figure():
    bits = np.array([2, 4, 8])
    cost = np.zeros((2, 3))
    nw, macs = np.array([100, 300]), np.array([1000, 3000])
    allowed = np.array([[True, True, True], [False, True, True]])
    message = r"budget avg_bits=1\.5 is infeasible: the smallest feasible average is 2\.0 bits"
    with pytest.raises(ValueError, match=message):
        allocate_bits(cost, bits, num_weights=nw, budget=Budget(avg_bits=1.5))
    with pytest.raises(ValueError) as info:
        allocate_bits(cost, bits, num_weights=nw, budget=Budget(avg_bits=3.0), allowed=allowed)
    assert first_number(str(info.value), "average is") == 3.5  # (100·2 + 300·4) / 400
    with pytest.raises(ValueError) as info:
        allocate_bits(cost, bits, num_weights=nw, scale_bytes=[10, 20], budget=Budget(model_bytes=100.0))
    assert first_number(str(info.value), "size is") == 25 + 75 + 30  # codes at 2 bits + scales
    with pytest.raises(ValueError) as info:
        allocate_bits(cost, bits, num_weights=nw, macs=macs, budget=Budget(bops=1.0), allowed=allowed)
    assert first_number(str(info.value), "count is") == 1000 * 4 + 3000 * 16
    # Several violated kinds are all named.
    with pytest.raises(ValueError, match="avg_bits=1.0 is infeasible.*bops=1.0 is infeasible"):
        allocate_bits(cost, bits, num_weights=nw, macs=macs, budget=Budget(avg_bits=1.0, bops=1.0))


def test_stated_smallest_average_is_itself_feasible():
    bits, nw = np.array([2, 3, 8]), np.array([1, 2])
    allowed = np.array([[True, True, True], [False, True, True]])  # smallest (2 + 6) / 3 = 2.666…
    with pytest.raises(ValueError) as info:
        allocate_bits(np.zeros((2, 3)), bits, num_weights=nw, budget=Budget(avg_bits=2.5), allowed=allowed)
    stated = first_number(str(info.value), "average is")
    assert 8 / 3 <= stated <= 8 / 3 + 1e-5
    result = allocate_bits(np.zeros((2, 3)), bits, num_weights=nw, budget=Budget(avg_bits=stated), allowed=allowed)
    np.testing.assert_array_equal(result.weight_bits, [2, 3])


def test_jointly_infeasible_budgets():
    # One item, options (w, a) = (2, 8) or (8, 2): each average alone is feasible, both are not.
    with pytest.raises(ValueError, match="infeasible together.*each\\s+alone is feasible"):
        allocate_bits(
            [[0.0, 0.0]],
            [2, 8],
            [8, 2],
            num_weights=[10],
            num_activations=[10],
            budget=Budget(avg_bits=3.0, avg_act_bits=3.0),
        )


def test_smallest_feasible_budget_and_usage():
    bits = np.array([2, 4, 8])
    nw, na, macs = np.array([100, 300]), np.array([10, 30]), np.array([1000, 3000])
    allowed = np.array([[True, True, True], [False, True, True]])
    low = smallest_feasible_budget(
        bits, num_weights=nw, num_activations=na, macs=macs, scale_bytes=[1, 2], allowed=allowed
    )
    assert low.avg_bits == 3.5 and low.avg_act_bits == 3.5
    assert low.model_bytes == 100 * 2 / 8 + 300 * 4 / 8 + 3 and low.bops == 1000 * 4 + 3000 * 16
    use = budget_usage([8, 4], num_weights=nw, num_activations=na, macs=macs)
    assert use.avg_bits == (800 + 1200) / 400 and use.bops == 1000 * 64 + 3000 * 16
    assert smallest_feasible_budget(bits, num_weights=nw).avg_act_bits is None
    assert bops_budget(macs, 4) == 16 * 4000 and bops_budget(macs, 4, 8) == 32 * 4000


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(cost=np.ones(3)), ValueError, r"cost must be \[n_items, m\].*\(3,\)"),
        (dict(weight_bits=[2, 4]), ValueError, r"weight_bits has shape \(2,\); with 2 items and 3 options"),
        (dict(act_bits=np.ones((3, 3), int)), ValueError, r"act_bits has shape \(3, 3\)"),
        (dict(weight_bits=[2, 4.5, 8]), ValueError, r"weight_bits must be positive integers, got \[4\.5\]"),
        (dict(weight_bits=[0, 4, 8]), ValueError, r"positive integers, got \[0\]"),
        (dict(cost=[[1.0, np.nan, 0.0], [1, 1, 1]]), ValueError, r"cost\[0, 1\] = nan is not finite"),
        (dict(cost=[[1.0, 1, 1], [1, np.inf, 1]]), ValueError, r"cost\[1, 1\] = inf"),
        (dict(num_weights=[10, -5]), ValueError, r"num_weights\[1\] = -5\.0 is not a finite non-negative"),
        (dict(num_weights=[10, 5, 1]), ValueError, r"num_weights must be \(2,\)"),
        (dict(macs=[1.0, np.nan], budget=Budget(bops=1e9)), ValueError, r"macs\[1\] = nan"),
        (
            dict(allowed=np.array([[True, False, True], [False, False, False]])),
            ValueError,
            r"no True entry for item\(s\) \[1\]",
        ),
        (dict(allowed=np.ones((2, 3), int)), TypeError, "boolean mask"),
        (dict(allowed=np.ones((3, 2), bool)), ValueError, r"allowed has shape \(3, 2\); it must be \(2, 3\)"),
        (dict(budget=Budget(bops=1e6)), ValueError, "budget bops=1000000.0 needs macs"),
        (dict(budget=Budget(avg_act_bits=4.0)), ValueError, "needs num_activations"),
        (dict(budget={"avg_bits": 4}), TypeError, "budget must be a Budget"),
        (dict(solver="cbc"), ValueError, "solver='cbc' is not one of"),
        (dict(time_limit=0), ValueError, "time_limit=0"),
        (dict(mip_gap=-0.1), ValueError, "mip_gap=-0.1"),
    ],
)
def test_bad_input_is_named(kwargs, error, message):
    args = dict(
        cost=np.ones((2, 3)), weight_bits=[2, 4, 8], act_bits=None, num_weights=[10, 20], budget=Budget(avg_bits=8.0)
    )
    args.update(kwargs)
    with pytest.raises(error, match=message):
        allocate_bits(args.pop("cost"), args.pop("weight_bits"), args.pop("act_bits"), **args)


def test_budget_validation():
    with pytest.raises(ValueError, match="at least one of"):
        Budget()
    with pytest.raises(ValueError, match=r"budget avg_bits=-1\.0 must be finite and non-negative"):
        Budget(avg_bits=-1.0)
    with pytest.raises(ValueError, match="bops=inf"):
        Budget(bops=float("inf"))
    with pytest.raises(TypeError):
        Budget(4.0)  # keyword-only
    assert Budget(avg_bits=4, bops=2e9).limits() == {"avg_bits": 4, "bops": 2e9}
