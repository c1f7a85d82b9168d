"""Bit allocation as a multiple-choice integer linear program (METHOD.md §5), host side.

An *item* is a layer, or a group of layers that share one bit-width. Item `i` has `m`
options; option `j` quantizes its weights to `b_w(i, j)` bits and its input activations to
`b_a(i, j)` bits (the two are equal when weights and activations are not allocated
separately). With binary `x[i, j]` (1 when item `i` takes option `j`):

    minimize    Σ_i Σ_j Ω[i, j] · x[i, j]
    subject to  Σ_j x[i, j] = 1                                   for every item i
                Σ_i Σ_j |W_i| · b_w(i, j) · x[i, j] ≤ β · Σ_i |W_i|        (avg_bits)
                Σ_i Σ_j |A_i| · b_a(i, j) · x[i, j] ≤ β_a · Σ_i |A_i|      (avg_act_bits)
                Σ_i Σ_j (|W_i| · b_w(i, j) / 8 + s_i) · x[i, j] ≤ S         (model_bytes)
                Σ_i Σ_j MACs_i · b_w(i, j) · b_a(i, j) · x[i, j] ≤ B        (bops)
                x[i, j] = 0 where the option is not allowed

Only the budgets that are set take part. The model is built from numpy arrays in compressed
sparse column form and handed to HiGHS in one call, one column per allowed option; SciPy's
`milp` (HiGHS inside SciPy) takes the same arrays when `highspy` is missing. With highspy
the LP relaxation comes first: its solution, rounded down and improved greedily, is
usually within the MIP gap of its bound already, and else starts the branch and bound.

This module knows numpy and HiGHS, not JAX or Flax.

Example:
    >>> bits = np.array([2, 3, 4, 5, 6, 8])
    >>> cost = omega  # [n_items, 6], e.g. Fisher-weighted quantization error
    >>> result = allocate_bits(cost, bits, num_weights=sizes, budget=Budget(avg_bits=4.0))
    >>> result.weight_bits  # [n_items]
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
import time
from typing import Optional

import numpy as np

try:
    import highspy
except ImportError:  # e.g. Colab's TPU runtime; `scipy.optimize.milp` takes over.
    highspy = None

SOLVERS = ("auto", "highs", "scipy")
BUDGET_KINDS = ("avg_bits", "avg_act_bits", "model_bytes", "bops")
# With highspy a budget holds when the spent fraction of it is ≤ 1 + _BUDGET_TOLERANCE.
_BUDGET_TOLERANCE = 1e-9


@dataclasses.dataclass(frozen=True, kw_only=True)
class Budget:
    """Resource limits for the allocation; at least one must be set.

    Attributes:
        avg_bits: β, the largest average weight bit-width, weighted by weight count:
            Σ_i |W_i| · b_w(i) ≤ β · Σ_i |W_i|.
        avg_act_bits: β_a, the largest average activation bit-width, weighted by activation
            count: Σ_i |A_i| · b_a(i) ≤ β_a · Σ_i |A_i|. Meaningful when weights and
            activations are allocated separately.
        model_bytes: S, the largest size of the allocated items in bytes, codes plus
            per-channel scales and zero points: Σ_i (|W_i| · b_w(i) / 8 + s_i) ≤ S.
        bops: B, the largest number of bit operations: Σ_i MACs_i · b_w(i) · b_a(i) ≤ B.
            `bops_budget(macs, bits)` gives the figure of a uniform bit-width.
    """

    avg_bits: Optional[float] = None
    avg_act_bits: Optional[float] = None
    model_bytes: Optional[float] = None
    bops: Optional[float] = None

    def __post_init__(self):
        limits = self.limits()
        if not limits:
            raise ValueError(f"Budget needs at least one of {', '.join(BUDGET_KINDS)} set")
        for kind, value in limits.items():
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise TypeError(f"budget {kind} must be a number, got {value!r}")
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"budget {kind}={value!r} must be finite and non-negative")

    def limits(self) -> dict[str, float]:
        """The budgets that are set, as `{kind: value}` in the order of `BUDGET_KINDS`."""
        return {k: getattr(self, k) for k in BUDGET_KINDS if getattr(self, k) is not None}


@dataclasses.dataclass(frozen=True)
class AllocationResult:
    """The solution of `allocate_bits`.

    Attributes:
        choice: [n_items] int, index of the chosen option of every item.
        weight_bits: [n_items] int, b_w of the chosen options.
        act_bits: [n_items] int, b_a of the chosen options.
        objective: Σ_i Ω[i, choice[i]], in the units of `cost`.
        status: "optimal", or "time_limit" when the time limit stopped the search with a
            feasible but unproven assignment (then `mip_gap` says how far it may be).
        mip_gap: the relative gap between the objective and the solver's lower bound.
        solve_seconds: wall time to build the model, solve it and read it back.
        solver: "highs" (highspy) or "scipy" (scipy.optimize.milp).
    """

    choice: np.ndarray
    weight_bits: np.ndarray
    act_bits: np.ndarray
    objective: float
    status: str
    mip_gap: float
    solve_seconds: float
    solver: str


@dataclasses.dataclass(frozen=True)
class _Options:
    """Validated option tables; every array is float64 or int64, `n` items by `m` options."""

    weight_bits: np.ndarray  # [n, m] int64
    act_bits: np.ndarray  # [n, m] int64
    allowed: np.ndarray  # [n, m] bool
    num_weights: np.ndarray  # [n]
    num_activations: Optional[np.ndarray]  # [n]
    macs: Optional[np.ndarray]  # [n]
    scale_bytes: np.ndarray  # [n]


def bops_budget(macs: np.ndarray, bits: float, act_bits: Optional[float] = None) -> float:
    """The BOPs of running every item at one bit-width: `bits · act_bits · Σ_i MACs_i`.

    Args:
        macs: [n_items] multiply-accumulates per item (per sample).
        bits: weight bit-width.
        act_bits: activation bit-width; `bits` when None (the usual "W4A4" figure bits²·ΣMACs).

    Returns:
        The absolute BOPs figure, ready for `Budget(bops=...)`.
    """
    macs = _counts(macs, "macs", None)
    act_bits = bits if act_bits is None else act_bits
    for name, value in (("bits", bits), ("act_bits", act_bits)):
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"{name}={value!r} must be finite and positive")
    return float(bits) * float(act_bits) * float(macs.sum())


def smallest_feasible_budget(
    weight_bits,
    act_bits=None,
    *,
    num_weights,
    num_activations=None,
    macs=None,
    scale_bytes=None,
    allowed=None,
) -> Budget:
    """The smallest value of every budget kind that admits an assignment, each kind alone.

    For a kind with coefficient c[i, j] (see the module docstring) the smallest total is
    Σ_i min_{j allowed} c[i, j], reached by giving every item its allowed option with the
    least coefficient; it is then expressed in the budget's units (average bits for the
    averages, bytes, BOPs). Kinds whose counts are not given (`num_activations`, `macs`)
    are left None; so is `avg_bits` when `Σ num_weights = 0`.

    Args:
        weight_bits: [m] or [n_items, m] int, b_w of every option.
        act_bits: [m] or [n_items, m] int, b_a of every option; `weight_bits` when None.
        num_weights: [n_items] |W_i|, weight count of every item.
        num_activations: [n_items] |A_i|, activation count of every item, or None.
        macs: [n_items] multiply-accumulates of every item, or None.
        scale_bytes: [n_items] s_i, bytes of per-channel scales and zero points, or None (0).
        allowed: [n_items, m] bool, the options an item may take; all when None.

    Returns:
        A `Budget` whose fields are the smallest feasible values.
    """
    num_weights = _counts(num_weights, "num_weights", None)
    n = num_weights.shape[0]
    weight_bits = np.asarray(weight_bits)
    if weight_bits.ndim not in (1, 2):
        raise ValueError(f"weight_bits must be [m] or [n_items, m], got shape {weight_bits.shape}")
    options = _validate_options(
        n,
        weight_bits.shape[-1],
        weight_bits,
        act_bits,
        num_weights,
        num_activations,
        macs,
        scale_bytes,
        allowed,
    )
    return _smallest_feasible(options)


def budget_usage(
    weight_bits, act_bits=None, *, num_weights, num_activations=None, macs=None, scale_bytes=None
) -> Budget:
    """What an assignment spends of every budget kind, in the budget's units.

    Args:
        weight_bits: [n_items] int, b_w(i) of every item.
        act_bits: [n_items] int, b_a(i) of every item; `weight_bits` when None.
        num_weights, num_activations, macs, scale_bytes: as in `allocate_bits`.

    Returns:
        A `Budget` with the average weight bits Σ|W_i|b_w(i)/Σ|W_i|, the model bytes
        Σ(|W_i|b_w(i)/8 + s_i), and, when their counts are given, the average activation
        bits and the BOPs Σ MACs_i b_w(i) b_a(i). An assignment meets a budget when every
        set field of the budget is at least the corresponding figure here.
    """
    weight_bits = np.asarray(weight_bits)
    if weight_bits.ndim != 1:
        raise ValueError(f"weight_bits must be [n_items], got shape {weight_bits.shape}")
    act_bits = None if act_bits is None else np.asarray(act_bits)[:, None]
    if act_bits is not None and act_bits.shape[0] != weight_bits.shape[0]:
        raise ValueError(f"act_bits has {act_bits.shape[0]} entries but weight_bits has {weight_bits.shape[0]}")
    return smallest_feasible_budget(
        weight_bits[:, None],
        act_bits,
        num_weights=num_weights,
        num_activations=num_activations,
        macs=macs,
        scale_bytes=scale_bytes,
    )


def allocate_bits(
    cost,
    weight_bits,
    act_bits=None,
    *,
    num_weights,
    budget: Budget,
    num_activations=None,
    macs=None,
    scale_bytes=None,
    allowed=None,
    time_limit: float = 60.0,
    mip_gap: float = 1e-4,
    solver: str = "auto",
) -> AllocationResult:
    """Chooses one option per item to minimize the total cost within the budget.

    Solves the integer program in the module docstring: minimize Σ_i Σ_j Ω[i, j] x[i, j]
    subject to Σ_j x[i, j] = 1, every budget set in `budget`, x binary, and x[i, j] = 0
    where `allowed[i, j]` is False.

    Args:
        cost: [n_items, m] Ω[i, j], the cost of item i at option j. Entries of options that
            are not allowed are ignored and may be inf or NaN; the others must be finite.
        weight_bits: [m] or [n_items, m] int, b_w of every option, e.g. [2, 3, 4, 5, 6, 8].
        act_bits: [m] or [n_items, m] int, b_a of every option; `weight_bits` when None
            (weights and activations at one bit-width). Pass the pairs' two halves in
            `weight_bits` and `act_bits` to allocate them separately.
        num_weights: [n_items] |W_i|, weight count of every item.
        budget: the limits; see `Budget`.
        num_activations: [n_items] |A_i|; needed by `budget.avg_act_bits`.
        macs: [n_items] multiply-accumulates per sample; needed by `budget.bops`.
        scale_bytes: [n_items] s_i, bytes of per-channel scales and zero points; 0 when None.
        allowed: [n_items, m] bool, the options an item may take (per-type minimum and
            maximum bits, items fixed by the user); all options when None.
        time_limit: seconds the solver may take, all its phases together.
        mip_gap: the relative gap (objective − lower bound) / |objective| at which the
            solver stops.
        solver: "highs" (highspy), "scipy" (scipy.optimize.milp), or "auto": highspy when it
            is importable, else scipy. With "highs" the LP relaxation is solved first and its
            rounded solution returned when it is already within `mip_gap` (the usual case
            for many items); branch and bound starts from it otherwise. A budget holds to a
            relative tolerance of 1e-9 with "highs" and 1e-6 (SciPy's default) with "scipy".

    Returns:
        An `AllocationResult`.

    Raises:
        ValueError: on inconsistent shapes, non-finite costs, negative counts, an item
            without an allowed option, or an infeasible budget; the message of the last
            states the smallest feasible value of every violated budget.
        RuntimeError: when the solver stops without any feasible assignment.
    """
    start = time.perf_counter()
    if not isinstance(budget, Budget):
        raise TypeError(f"budget must be a Budget, got {type(budget).__name__}")
    if solver not in SOLVERS:
        raise ValueError(f"solver={solver!r} is not one of {SOLVERS}")
    if solver == "auto":
        solver = "highs" if highspy is not None else "scipy"
    if solver == "highs" and highspy is None:
        raise ImportError("solver='highs' needs highspy (pip install highspy); or use solver='scipy'")
    if not (isinstance(time_limit, numbers.Real) and time_limit > 0):
        raise ValueError(f"time_limit={time_limit!r} must be a positive number of seconds")
    if not (isinstance(mip_gap, numbers.Real) and 0 <= mip_gap < math.inf):
        raise ValueError(f"mip_gap={mip_gap!r} must be finite and non-negative")

    cost = np.asarray(cost, dtype=np.float64)
    if cost.ndim != 2 or cost.shape[0] == 0 or cost.shape[1] == 0:
        raise ValueError(f"cost must be [n_items, m] with n_items, m ≥ 1, got shape {cost.shape}")
    n, m = cost.shape
    options = _validate_options(n, m, weight_bits, act_bits, num_weights, num_activations, macs, scale_bytes, allowed)
    _check_costs(cost, options.allowed)
    rows = _budget_rows(options, budget)
    _raise_if_alone_infeasible(options, budget)
    allowed, rows = _fold_zero_budgets(options.allowed, rows)
    if not allowed.any(axis=1).all():
        raise ValueError(_joint_infeasibility_message(options, budget))
    if not rows:  # nothing couples the items: each takes its cheapest option
        choice = np.argmin(np.where(allowed, cost, np.inf), axis=1)
        return _result(choice, cost, options, "optimal", 0.0, start, solver)

    model = _sparse_model(cost, allowed, rows)
    if solver == "highs":
        x, status, gap = _solve_highs(model, _loads(rows), n, m, time_limit=float(time_limit), mip_gap=float(mip_gap))
    else:
        x, status, gap = _solve_scipy(model, time_limit=float(time_limit), mip_gap=float(mip_gap))
    if status == "infeasible":
        raise ValueError(_joint_infeasibility_message(options, budget))
    if x is None:
        raise RuntimeError(
            f"the {solver} solver stopped with status {status!r} and no feasible assignment "
            f"(time_limit={time_limit!r} s); raise time_limit or loosen the budget"
        )

    choice = _dense(x, model, n, m, -np.inf).argmax(axis=1)  # the column at 1 of every item
    return _result(choice, cost, options, status, gap, start, solver)


def _result(choice, cost, options: _Options, status: str, gap: float, began: float, solver: str) -> AllocationResult:
    """Packs the chosen options [n] of `allocate_bits` into an `AllocationResult`."""
    items = np.arange(choice.size)
    return AllocationResult(
        choice=choice,
        weight_bits=options.weight_bits[items, choice],
        act_bits=options.act_bits[items, choice],
        objective=float(cost[items, choice].sum()),
        status=status,
        mip_gap=float(gap),
        solve_seconds=time.perf_counter() - began,
        solver=solver,
    )


# ----------------------------------------------------------------------------- validation


def _counts(values, name: str, n: Optional[int]) -> np.ndarray:
    """[n] float64 counts, finite and non-negative, or a ValueError naming the first bad one."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1 or (n is not None and arr.shape[0] != n):
        want = "[n_items]" if n is None else f"({n},), one per item"
        raise ValueError(f"{name} must be {want}, got shape {arr.shape}")
    bad = np.flatnonzero(~np.isfinite(arr) | (arr < 0))
    if bad.size:
        i = int(bad[0])
        raise ValueError(
            f"{name}[{i}] = {float(arr[i])!r} is not a finite non-negative count "
            f"({bad.size} such entr{'y' if bad.size == 1 else 'ies'})"
        )
    return arr


def _bits(values, name: str, n: int, m: int) -> np.ndarray:
    """[n, m] int64 bit-widths from [m] or [n, m] positive integers."""
    arr = np.asarray(values)
    if arr.shape not in ((m,), (n, m)):
        raise ValueError(
            f"{name} has shape {arr.shape}; with {n} items and {m} options it must be ({m},) or ({n}, {m})"
        )
    if arr.dtype == bool or not np.issubdtype(arr.dtype, np.number):
        raise TypeError(f"{name} must hold integers, got dtype {arr.dtype}")
    flat = arr.astype(np.float64).ravel()
    bad = ~np.isfinite(flat) | (flat < 1) | (flat != np.round(flat))
    if bad.any():
        values = np.unique(arr.ravel()[bad]).tolist()
        raise ValueError(f"{name} must be positive integers, got {values}")
    return np.broadcast_to(arr.astype(np.int64), (n, m)).copy()


def _validate_options(
    n, m, weight_bits, act_bits, num_weights, num_activations, macs, scale_bytes, allowed
) -> _Options:
    """Checks and normalizes everything but the costs; see `allocate_bits` for the shapes."""
    wb = _bits(weight_bits, "weight_bits", n, m)
    ab = wb if act_bits is None else _bits(act_bits, "act_bits", n, m)
    if allowed is None:
        mask = np.ones((n, m), dtype=bool)
    else:
        mask = np.asarray(allowed)
        if mask.dtype != bool:
            raise TypeError(f"allowed must be a boolean mask, got dtype {mask.dtype}")
        if mask.shape != (n, m):
            raise ValueError(f"allowed has shape {mask.shape}; it must be ({n}, {m})")
        empty = np.flatnonzero(~mask.any(axis=1))
        if empty.size:
            raise ValueError(
                f"allowed has no True entry for item(s) {empty[:10].tolist()}"
                f"{' …' if empty.size > 10 else ''}: every item needs at least one allowed option"
            )
    return _Options(
        weight_bits=wb,
        act_bits=ab,
        allowed=mask,
        num_weights=_counts(num_weights, "num_weights", n),
        num_activations=(None if num_activations is None else _counts(num_activations, "num_activations", n)),
        macs=None if macs is None else _counts(macs, "macs", n),
        scale_bytes=np.zeros(n) if scale_bytes is None else _counts(scale_bytes, "scale_bytes", n),
    )


def _check_costs(cost: np.ndarray, allowed: np.ndarray) -> None:
    """Raises when an allowed option has a NaN or infinite cost."""
    bad = np.argwhere(allowed & ~np.isfinite(cost))
    if bad.size:
        i, j = (int(v) for v in bad[0])
        raise ValueError(
            f"cost[{i}, {j}] = {float(cost[i, j])!r} is not finite; {len(bad)} allowed "
            "option(s) have NaN or infinite costs (mark options to skip with `allowed` instead)"
        )


# ----------------------------------------------------------------------------- budgets


@dataclasses.dataclass(frozen=True)
class _BudgetRow:
    """A budget as the row Σ_ij coeff[i, j] x[i, j] ≤ limit; total / `unit` is in its units."""

    kind: str
    coeff: np.ndarray  # [n, m]
    limit: float
    unit: float


def _coefficients(options: _Options, kind: str) -> Optional[tuple[np.ndarray, float]]:
    """(coeff [n, m], unit) of a budget kind, or None when its counts are missing.

    The coefficients are in natural units (bit counts, bytes, BOPs); `unit` divides a
    total into the budget's units (Σ|W_i| for average weight bits, Σ|A_i| for average
    activation bits, 1 for bytes and BOPs).
    """
    o = options
    if kind == "avg_bits":
        total = o.num_weights.sum()
        return (o.num_weights[:, None] * o.weight_bits, total) if total > 0 else None
    if kind == "avg_act_bits":
        if o.num_activations is None or o.num_activations.sum() <= 0:
            return None
        return o.num_activations[:, None] * o.act_bits, o.num_activations.sum()
    if kind == "model_bytes":
        return o.num_weights[:, None] * o.weight_bits / 8.0 + o.scale_bytes[:, None], 1.0
    if kind == "bops":
        return None if o.macs is None else (o.macs[:, None] * o.weight_bits * o.act_bits, 1.0)
    raise ValueError(f"unknown budget kind {kind!r}; expected one of {BUDGET_KINDS}")


def _budget_rows(options: _Options, budget: Budget) -> list[_BudgetRow]:
    """The rows of the budgets that are set, or a ValueError naming a missing count."""
    needs = {
        "avg_bits": "num_weights with a positive sum",
        "avg_act_bits": "num_activations with a positive sum",
        "bops": "macs",
    }
    rows = []
    for kind, value in budget.limits().items():
        found = _coefficients(options, kind)
        if found is None:
            raise ValueError(f"budget {kind}={value!r} needs {needs[kind]}")
        coeff, unit = found
        rows.append(_BudgetRow(kind, coeff, float(value) * unit, unit))
    return rows


def _fold_zero_budgets(allowed: np.ndarray, rows: list[_BudgetRow]) -> tuple[np.ndarray, list[_BudgetRow]]:
    """A budget of 0 admits only the options that spend none of it: moves it into the mask.

    Returns:
        (allowed [n, m] without the options that spend a zero budget, the other rows).
    """
    for row in rows:
        if row.limit == 0:
            allowed = allowed & (row.coeff <= 0)
    return allowed, [row for row in rows if row.limit > 0]


def _smallest_feasible(options: _Options) -> Budget:
    """Budget of Σ_i min_{j allowed} coeff[i, j] / unit for every kind that can be computed."""
    values = {}
    for kind in BUDGET_KINDS:
        found = _coefficients(options, kind)
        if found is not None:
            coeff, unit = found
            values[kind] = float(np.where(options.allowed, coeff, np.inf).min(axis=1).sum() / unit)
    return Budget(**values)


def _ceil_significant(value: float, digits: int = 6) -> float:
    """Rounds up to `digits` significant digits, so a printed minimum is itself feasible."""
    if value <= 0 or not math.isfinite(value):
        return value
    scale = 10.0 ** (digits - 1 - math.floor(math.log10(value)))
    return math.ceil(value * scale * (1 - 1e-12)) / scale


def _describe_minimum(kind: str, value: float, options: _Options) -> str:
    """The smallest feasible value of a budget kind, in words and rounded up."""
    if kind == "avg_bits":
        return f"the smallest feasible average is {_ceil_significant(value)!r} bits"
    if kind == "avg_act_bits":
        return f"the smallest feasible average is {_ceil_significant(value)!r} activation bits"
    if kind == "model_bytes":
        b = math.ceil(value * (1 - 1e-12))
        return f"the smallest feasible size is {b} bytes ({b / 2**20:.4g} MiB)"
    total_macs = options.macs.sum()
    uniform = f" (uniform {math.sqrt(value / total_macs):.4g} bits)" if total_macs > 0 else ""
    return f"the smallest feasible count is {math.ceil(value * (1 - 1e-12))} BOPs{uniform}"


def _raise_if_alone_infeasible(options: _Options, budget: Budget) -> None:
    """Raises when a budget alone is below its smallest feasible value, naming that value."""
    smallest = _smallest_feasible(options)
    problems = []
    for kind, value in budget.limits().items():
        floor = getattr(smallest, kind)
        if value < floor * (1 - 1e-9):
            problems.append(f"budget {kind}={value!r} is infeasible: {_describe_minimum(kind, floor, options)}")
    if problems:
        raise ValueError("; ".join(problems))


def _joint_infeasibility_message(options: _Options, budget: Budget) -> str:
    smallest = _smallest_feasible(options)
    limits = budget.limits()
    alone = ", ".join(f"{k}={_ceil_significant(getattr(smallest, k))!r}" for k in limits)
    given = ", ".join(f"{k}={v!r}" for k, v in limits.items())
    return (
        f"the budgets {given} are infeasible together under the allowed options, although each "
        f"alone is feasible (smallest feasible values alone: {alone}); loosen one of them"
    )


# ----------------------------------------------------------------------------- model


@dataclasses.dataclass(frozen=True)
class _SparseModel:
    """min c·x s.t. row_lower ≤ A x ≤ row_upper, x ∈ {0, 1}; A in CSC (start, index, value).

    Column k is option `col_option[k]` of item `col_item[k]`; only allowed options get one.
    Rows 0..n-1 are the one-option-per-item equalities, the rest the budgets.
    """

    cost: np.ndarray  # [K], Ω / max |Ω|
    col_item: np.ndarray  # [K]
    col_option: np.ndarray  # [K]
    start: np.ndarray  # [K + 1] int32
    index: np.ndarray  # [nnz] int32
    value: np.ndarray  # [nnz]
    row_lower: np.ndarray  # [n + R]
    row_upper: np.ndarray  # [n + R]


def _sparse_model(cost: np.ndarray, allowed: np.ndarray, rows: list[_BudgetRow]) -> _SparseModel:
    """Builds the program's arrays with numpy; no Python loop over items or options.

    Every budget row is divided by its limit (Σ_ij coeff[i, j] / limit · x[i, j] ≤ 1) and
    the costs by max |Ω| over the allowed options, so that the solver sees numbers of order
    one whatever the units (BOPs reach 1e13); the solution does not change.
    """
    n = cost.shape[0]
    col_item, col_option = np.nonzero(allowed)  # row-major: columns grouped by item
    k = col_item.size
    entry_row = np.empty((k, 1 + len(rows)), dtype=np.int32)
    entry_val = np.empty((k, 1 + len(rows)), dtype=np.float64)
    entry_row[:, 0] = col_item
    entry_val[:, 0] = 1.0
    for r, row in enumerate(rows):
        entry_row[:, 1 + r] = n + r
        entry_val[:, 1 + r] = row.coeff[col_item, col_option] / row.limit
    keep = entry_val != 0  # row-major flattening keeps each column's entries together
    start = np.zeros(k + 1, dtype=np.int32)
    np.cumsum(keep.sum(axis=1), out=start[1:])
    c = cost[col_item, col_option]
    scale = float(np.abs(c).max()) or 1.0
    return _SparseModel(
        cost=c / scale,
        col_item=col_item,
        col_option=col_option,
        start=start,
        index=entry_row[keep],
        value=entry_val[keep],
        row_lower=np.concatenate([np.ones(n), np.full(len(rows), -np.inf)]),
        row_upper=np.ones(n + len(rows)),
    )


def _columns_from_choice(choice: np.ndarray, model: _SparseModel) -> np.ndarray:
    """[K] the 0/1 column values of an assignment `choice` [n]."""
    return (choice[model.col_item] == model.col_option).astype(np.float64)


def _dense(x: np.ndarray, model: _SparseModel, n: int, m: int, fill: float) -> np.ndarray:
    """[n, m] column values `x` [K] laid out by item and option, `fill` where no column."""
    out = np.full((n, m), fill)
    out[model.col_item, model.col_option] = x
    return out


# ----------------------------------------------------------------------------- start from the LP


def _loads(rows: list[_BudgetRow]) -> np.ndarray:
    """[R, n, m] the budgets' coefficients over their limits (a budget holds when Σ ≤ 1)."""
    return np.stack([row.coeff / row.limit for row in rows])


def _usage(loads: np.ndarray, choice: np.ndarray) -> np.ndarray:
    """[R] Σ_i loads[r, i, choice[i]]: the fraction of every budget an assignment spends."""
    return loads[:, np.arange(choice.size), choice].sum(axis=1)


def _round_down(x: np.ndarray, loads: np.ndarray) -> np.ndarray:
    """[n] rounds an LP solution x [n, m]: every item takes, among the options it uses
    (x > 1e-9), the one with the least total load Σ_r loads[r, i, j].

    Items that the LP already assigns whole keep their option. A basic LP solution splits at
    most R items, so the rounding changes at most R items and, when their cheaper-in-load
    option is cheaper in every budget, keeps the assignment within budget.
    """
    total = loads.sum(axis=0)
    return np.argmin(np.where(x > 1e-9, total, np.inf), axis=1)


def _greedy_improve(choice: np.ndarray, cost: np.ndarray, loads: np.ndarray, max_moves: int) -> np.ndarray:
    """Spends the budgets' slack: repeatedly moves the one item whose move fits best.

    A move of item i to option j fits when loads[r, i, j] − loads[r, i, choice[i]] ≤ slack_r
    for every budget r, and improves when it lowers Ω. Among fitting improving moves, the
    one with the largest cost decrease per fraction of the tightest slack it uses is taken.

    Args:
        choice: [n] a feasible assignment.
        cost: [n, m] Ω, +inf where an option is not allowed.
        loads: [R, n, m] from `_loads`.
        max_moves: the most moves to make.

    Returns:
        [n] a feasible assignment at most as costly as `choice`.
    """
    items = np.arange(choice.size)
    choice = choice.copy()
    for _ in range(max_moves):
        current = loads[:, items, choice]  # [R, n]
        slack = 1.0 + _BUDGET_TOLERANCE - current.sum(axis=1)  # [R]
        delta = loads - current[:, :, None]  # [R, n, m]
        gain = cost[items, choice][:, None] - cost  # [n, m]
        fits = np.all(delta <= slack[:, None, None], axis=0) & (gain > 0)
        if not fits.any():
            break
        used = np.max(np.maximum(delta, 0.0) / np.maximum(slack, 1e-300)[:, None, None], axis=0)
        score = np.where(fits, gain / np.maximum(used, 1e-12), -np.inf)
        i, j = np.unravel_index(np.argmax(score), score.shape)
        choice[i] = j
    return choice


def _start_from_lp(x: np.ndarray, cost: np.ndarray, loads: np.ndarray) -> Optional[np.ndarray]:
    """[n] a feasible assignment near the LP solution x [n, m], or None when rounding fails.

    Rounds down the split items (`_round_down`), then spends the slack (`_greedy_improve`).
    """
    choice = _round_down(x, loads)
    if not np.all(_usage(loads, choice) <= 1.0 + _BUDGET_TOLERANCE):
        return None
    return _greedy_improve(choice, cost, loads, max_moves=100)


def _relative_gap(primal: float, bound: float) -> float:
    """(primal − bound) / |primal|, HiGHS's MIP gap; 0 when primal ≤ bound."""
    if primal <= bound:
        return 0.0
    return (primal - bound) / abs(primal) if primal != 0 else math.inf


# ----------------------------------------------------------------------------- solvers


def _snake_case(name: str) -> str:
    """'kTimeLimit' → 'time_limit'."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name.removeprefix("k")).lower()


def _highs_with_model(model: _SparseModel, *, integer: bool, time_limit: float, mip_gap: float):
    """A silent HiGHS instance holding the model (binary when `integer`, else its LP relaxation)."""
    # The bare core class: the public `highspy.Highs` registers Python callbacks whose
    # logger prints a banner before `output_flag` can be turned off; we need no callbacks.
    h = getattr(highspy, "_Highs", highspy.Highs)()
    h.setOptionValue("output_flag", False)
    h.setOptionValue("time_limit", max(time_limit, 1e-3))
    h.setOptionValue("mip_rel_gap", mip_gap)
    h.setOptionValue("mip_abs_gap", 0.0)  # Ω can be tiny; only the relative gap decides
    h.setOptionValue("primal_feasibility_tolerance", _BUDGET_TOLERANCE)
    h.setOptionValue("mip_feasibility_tolerance", _BUDGET_TOLERANCE)
    k, num_rows = model.cost.size, model.row_lower.size
    inf = h.getInfinity()
    kind = highspy.HighsVarType.kInteger if integer else highspy.HighsVarType.kContinuous
    status = h.passModel(
        k,
        num_rows,
        model.index.size,
        int(highspy.MatrixFormat.kColwise),
        int(highspy.ObjSense.kMinimize),
        0.0,
        model.cost,
        np.zeros(k),
        np.ones(k),
        np.maximum(model.row_lower, -inf),
        np.minimum(model.row_upper, inf),
        model.start,
        model.index,
        model.value,
        np.full(k, int(kind), dtype=np.int32),
    )
    if status == highspy.HighsStatus.kError:
        raise RuntimeError(f"HiGHS rejected the model (passModel returned {status})")
    return h


def _solve_highs(model: _SparseModel, loads: np.ndarray, n: int, m: int, *, time_limit: float, mip_gap: float):
    """Solves with highspy; returns (x [K] or None, status, mip_gap).

    First the LP relaxation: its optimum bounds the integer optimum from below, and its
    solution, rounded down and improved (`_start_from_lp`), is a feasible assignment. When
    that assignment is within `mip_gap` of the bound it is returned as optimal; otherwise
    the integer program is solved by branch and bound, started from it.
    """
    began = time.perf_counter()
    cost = _dense(model.cost, model, n, m, np.inf)
    lp = _highs_with_model(model, integer=False, time_limit=time_limit, mip_gap=mip_gap)
    lp.run()
    lp_status = lp.getModelStatus()
    if lp_status == highspy.HighsModelStatus.kInfeasible:
        return None, "infeasible", math.nan
    start = None
    if lp_status == highspy.HighsModelStatus.kOptimal:
        x_lp = _dense(np.asarray(lp.getSolution().col_value), model, n, m, 0.0)
        start = _start_from_lp(x_lp, cost, loads)
    if start is not None:
        gap = _relative_gap(cost[np.arange(n), start].sum(), lp.getInfo().objective_function_value)
        if gap <= mip_gap:
            return _columns_from_choice(start, model), "optimal", gap
    remaining = time_limit - (time.perf_counter() - began)
    if remaining <= 0:
        return (
            (None, "time_limit", math.nan) if start is None else (_columns_from_choice(start, model), "time_limit", gap)
        )

    h = _highs_with_model(model, integer=True, time_limit=remaining, mip_gap=mip_gap)
    if start is not None:
        h.setSolution(model.cost.size, np.arange(model.cost.size, dtype=np.int32), _columns_from_choice(start, model))
    h.run()
    model_status = h.getModelStatus()
    if model_status == highspy.HighsModelStatus.kInfeasible:
        return None, "infeasible", math.nan
    info = h.getInfo()
    feasible = int(highspy.SolutionStatus.kSolutionStatusFeasible)
    has_solution = info.primal_solution_status == feasible
    x = np.asarray(h.getSolution().col_value) if has_solution else None
    return x, _snake_case(model_status.name), info.mip_gap


def _solve_scipy(model: _SparseModel, *, time_limit: float, mip_gap: float):
    """Solves with scipy.optimize.milp; returns (x [K] or None, status, mip_gap)."""
    from scipy import optimize, sparse

    k, num_rows = model.cost.size, model.row_lower.size
    a = sparse.csc_array((model.value, model.index, model.start), shape=(num_rows, k))
    res = optimize.milp(
        model.cost,
        integrality=np.ones(k),
        bounds=optimize.Bounds(0.0, 1.0),
        constraints=optimize.LinearConstraint(a, model.row_lower, model.row_upper),
        options={"time_limit": time_limit, "mip_rel_gap": mip_gap, "disp": False},
    )
    names = {0: "optimal", 1: "time_limit", 2: "infeasible", 3: "unbounded"}
    status = names.get(res.status, "other")
    x = None if status == "infeasible" or res.x is None else np.asarray(res.x)
    return x, status, getattr(res, "mip_gap", math.nan)
