"""The allocation problem of a model: its items (layers that share bits), their options, masks, sizes and budget.

An item is a set of layers that take the same bits: a layer, its attention's q/k/v group, or its module (LampQ
without I1). Each item has the same options: the candidate bits, tied (b_w = b_a, m options) or separate
(every pair (b_w, b_a), m² options). The cost of an option is

    cost[item, option] = Σ_{i ∈ item} Ω^W_i(b_w) + Ω^A_i(b_a)

and `allocation_problem` hands it to the ILP (`allocation.ilp.allocate_bits`) with the items' sizes, the
budget and the options each item may take.

Host-side numpy; no Flax. `layers` are `lampq_jax.layers.Layer`s and `config` a `LampQConfig`, read by
their fields only (`allocation/` sits below both).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Sequence

import numpy as np

from lampq_jax.allocation.ilp import AllocationResult, Budget, allocate_bits, bops_budget

SCALE_BYTES_PER_CHANNEL = 8  # float32 scale + float32 zero point
ATTENTION_AND_MLP_TYPES = ("qkv", "proj", "fc1", "fc2")


@dataclasses.dataclass(frozen=True)
class Items:
    """The allocation's items (groups of layers sharing bits) and their options."""

    keys: tuple[str, ...]  # item name
    members: tuple[tuple[int, ...], ...]  # layer indices of each item
    weight_bits: np.ndarray  # [m] option weight bits
    act_bits: np.ndarray  # [m] option activation bits
    w_index: np.ndarray  # [m] index into candidates of the weight bits
    a_index: np.ndarray  # [m] index into candidates of the activation bits


def item_key(layer: Any, config: Any) -> str:
    """The allocation item of a layer: its module (I1 off), itself (split q/k/v), or its group."""
    if config.granularity == "module" and layer.type in ATTENTION_AND_MLP_TYPES and "/" in layer.path:
        return layer.path.rsplit("/", 1)[0]
    return layer.path if config.split_qkv else layer.group


def build_items(layers: Sequence[Any], config: Any) -> Items:
    """Items of `layers` under `config` (granularity, split_qkv), with the candidate options, in layer order."""
    keys: dict[str, list[int]] = {}
    for i, layer in enumerate(layers):
        keys.setdefault(item_key(layer, config), []).append(i)
    cands = np.array(config.candidates)
    m = len(cands)
    if config.separate_weight_act_bits:
        w_index, a_index = (g.ravel() for g in np.meshgrid(np.arange(m), np.arange(m), indexing="ij"))
    else:
        w_index = a_index = np.arange(m)
    return Items(tuple(keys), tuple(tuple(v) for v in keys.values()), cands[w_index], cands[a_index], w_index, a_index)


def item_costs(items: Items, layer_cost_w: np.ndarray, layer_cost_a: np.ndarray) -> np.ndarray:
    """[items, options] Σ_{i∈item} (Ω^W_i(b_w) + Ω^A_i(b_a)), from per-layer costs [layers, candidates]."""
    return np.stack(
        [
            layer_cost_w[list(mem)][:, items.w_index].sum(0) + layer_cost_a[list(mem)][:, items.a_index].sum(0)
            for mem in items.members
        ]
    )


def budget_of(config: Any, budget: float, macs: np.ndarray) -> Budget:
    """`budget` as the ILP's Budget of `config.budget_kind` (average bits also bound the activations when they
    are allocated separately)."""
    if config.budget_kind == "avg_bits":
        return Budget(avg_bits=budget, avg_act_bits=budget if config.separate_weight_act_bits else None)
    if config.budget_kind == "bops":
        return Budget(bops=bops_budget(macs, budget))
    return Budget(model_bytes=budget)


def allowed_options(items: Items, layers: Sequence[Any], config: Any) -> np.ndarray:
    """[items, options] mask from per-type min / max bits and the user's fixed layers.

    Raises:
      ValueError: an item that no option satisfies, naming it and the constraints.
    """
    low, high = dict(config.min_bits), dict(config.max_bits)
    fixed = dict(config.fixed_layers)
    allowed = np.ones([len(items.keys), items.weight_bits.size], bool)
    for k, mem in enumerate(items.members):
        for i in mem:
            t, path = layers[i].type, layers[i].path
            for bits in (items.weight_bits, items.act_bits):
                if t in low:
                    allowed[k] &= bits >= low[t]
                if t in high:
                    allowed[k] &= bits <= high[t]
            if path in fixed:
                allowed[k] &= (items.weight_bits == fixed[path]) & (items.act_bits == fixed[path])
        if not allowed[k].any():
            raise ValueError(
                f"item {items.keys[k]!r} has no allowed bit-width under min_bits={config.min_bits}, "
                f"max_bits={config.max_bits}, fixed_layers={config.fixed_layers}"
            )
    return allowed


def uniform_choice(items: Items, allowed: np.ndarray, config: Any, budget: float) -> np.ndarray | None:
    """[items] the option W b A b of every item, b the largest candidate ≤ `budget` (the uniform assignment at
    the budget), or None where it is not a point of the problem: a 'model_bytes' budget, no such candidate, or
    an item that may not take it (min / max bits, fixed layers). Under 'avg_bits' and 'bops' it is feasible:
    its average is b ≤ β and its BOPs b² Σ MACs ≤ β² Σ MACs."""
    below = [b for b in config.candidates if b <= budget]
    if config.budget_kind == "model_bytes" or not below:
        return None
    b = max(below)
    option = np.flatnonzero((items.weight_bits == b) & (items.act_bits == b))
    if option.size != 1 or not allowed[:, option[0]].all():
        return None
    return np.full(len(items.keys), option[0])


def assignment_of(items: Items, layers: Sequence[Any], choice: np.ndarray) -> dict[str, tuple[int, int]]:
    """{layer path: (weight bits, activation bits)} of the option `choice[item]` of every item."""
    return {
        layers[i].path: (int(items.weight_bits[c]), int(items.act_bits[c]))
        for mem, c in zip(items.members, choice)
        for i in mem
    }


def scale_bytes(layer: Any) -> int:
    """Bytes of a quantized kernel's per-channel scale and zero point: SCALE_BYTES_PER_CHANNEL · out channels."""
    return SCALE_BYTES_PER_CHANNEL * math.prod(layer.weight_shape[a] for a in layer.out_axes)


def item_sizes(items: Items, layers: Sequence[Any]) -> dict[str, np.ndarray]:
    """{num_weights, num_activations, macs, scale_bytes: [items]}, summed over each item's layers."""

    def total(size: Callable[[Any], int]) -> np.ndarray:
        return np.array([sum(size(layers[i]) for i in mem) for mem in items.members])

    return {
        "num_weights": total(lambda l: l.num_weights),
        "num_activations": total(lambda l: l.num_activations),
        "macs": total(lambda l: l.macs),
        "scale_bytes": total(scale_bytes),
    }


def allocation_problem(
    layers: Sequence[Any], config: Any, budget: float
) -> tuple[Items, Callable[[np.ndarray, np.ndarray], AllocationResult]]:
    """(the ILP's items, `solve(cost_w [layers, cands], cost_a [layers, cands]) → AllocationResult`)."""
    items = build_items(layers, config)
    sizes = item_sizes(items, layers)
    budget_obj, allowed = budget_of(config, budget, sizes["macs"]), allowed_options(items, layers, config)

    def solve(cost_w: np.ndarray, cost_a: np.ndarray) -> AllocationResult:
        return allocate_bits(
            item_costs(items, cost_w, cost_a),
            items.weight_bits,
            items.act_bits,
            **sizes,
            budget=budget_obj,
            allowed=allowed,
            time_limit=config.ilp_time_limit,
            mip_gap=config.mip_gap,
        )

    return items, solve
