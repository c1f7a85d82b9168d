"""The allocation problem of a model: items, options, costs, masks and the ILP they feed."""

import types

import numpy as np
import pytest

from lampq_jax import LampQConfig
from lampq_jax.allocation.items import (
    allocation_problem,
    allowed_options,
    assignment_of,
    build_items,
    item_costs,
    item_sizes,
    uniform_choice,
)

ATTN = "Transformer/encoderblock_0/MultiHeadDotProductAttention_0"
MLP = "Transformer/encoderblock_0/MlpBlock_0"


def _layer(path, type_, group=None, width=8):
    return types.SimpleNamespace(
        path=path,
        type=type_,
        group=group or path,
        weight_shape=(width, width),
        out_axes=(1,),
        num_weights=width * width,
        num_activations=width,
        macs=width * width,
    )


LAYERS = [
    _layer(f"{ATTN}/query", "qkv", f"{ATTN}/qkv"),
    _layer(f"{ATTN}/key", "qkv", f"{ATTN}/qkv"),
    _layer(f"{ATTN}/value", "qkv", f"{ATTN}/qkv"),
    _layer(f"{ATTN}/out", "proj"),
    _layer(f"{MLP}/Dense_0", "fc1", width=16),
    _layer(f"{MLP}/Dense_1", "fc2", width=16),
]


def test_items_follow_granularity_and_qkv_grouping():
    grouped = build_items(LAYERS, LampQConfig())
    assert grouped.keys == (f"{ATTN}/qkv", f"{ATTN}/out", f"{MLP}/Dense_0", f"{MLP}/Dense_1")
    assert grouped.members[0] == (0, 1, 2)
    assert len(build_items(LAYERS, LampQConfig(split_qkv=True)).keys) == 6
    modules = build_items(LAYERS, LampQConfig(granularity="module"))
    assert modules.keys == (ATTN, MLP) and modules.members == ((0, 1, 2, 3), (4, 5))


def test_options_tied_or_every_pair():
    cands = (2, 4, 8)
    tied = build_items(LAYERS, LampQConfig(candidates=cands))
    np.testing.assert_array_equal(tied.weight_bits, cands)
    np.testing.assert_array_equal(tied.act_bits, cands)
    separate = build_items(LAYERS, LampQConfig(candidates=cands, separate_weight_act_bits=True))
    pairs = set(zip(separate.weight_bits.tolist(), separate.act_bits.tolist()))
    assert pairs == {(w, a) for w in cands for a in cands} and separate.weight_bits.size == 9


def test_item_costs_sum_each_members_weight_and_activation_costs():
    config = LampQConfig(candidates=(2, 4, 8), separate_weight_act_bits=True)
    items = build_items(LAYERS, config)
    rng = np.random.default_rng(0)
    cost_w, cost_a = rng.uniform(size=(6, 3)), rng.uniform(size=(6, 3))
    costs = item_costs(items, cost_w, cost_a)
    assert costs.shape == (4, 9)
    option = 5  # some (b_w, b_a) pair
    w, a = items.w_index[option], items.a_index[option]
    assert costs[0, option] == pytest.approx(sum(cost_w[i, w] + cost_a[i, a] for i in (0, 1, 2)))


def test_sizes_sum_over_members():
    sizes = item_sizes(build_items(LAYERS, LampQConfig()), LAYERS)
    np.testing.assert_array_equal(sizes["num_weights"], [3 * 64, 64, 256, 256])
    np.testing.assert_array_equal(sizes["scale_bytes"], [3 * 8 * 8, 8 * 8, 8 * 16, 8 * 16])


def test_allowed_options_apply_bounds_and_fixed_layers_and_name_an_impossible_item():
    config = LampQConfig(
        candidates=(2, 4, 8), min_bits=(("fc2", 4),), fixed_layers=((f"{ATTN}/out", 8),), max_bits=(("qkv", 4),)
    )
    items = build_items(LAYERS, config)
    allowed = allowed_options(items, LAYERS, config)
    np.testing.assert_array_equal(allowed, [[1, 1, 0], [0, 0, 1], [1, 1, 1], [0, 1, 1]])
    impossible = LampQConfig(candidates=(2, 4, 8), min_bits=(("fc1", 5),), max_bits=(("fc1", 4),))
    with pytest.raises(ValueError, match=f"item '{MLP}/Dense_0' has no allowed bit-width.*min_bits"):
        allowed_options(build_items(LAYERS, impossible), LAYERS, impossible)


def test_solve_meets_the_budget_and_assigns_every_layer():
    config = LampQConfig(candidates=(2, 4, 8))
    items, solve = allocation_problem(LAYERS, config, 4.0)
    cost = np.tile([[4.0, 1.0, 0.0]], (6, 1))  # more bits always lower the cost
    cost[5] = [400.0, 100.0, 0.0]  # fc2 most of all: 8 bits there, 2 everywhere else
    bits = assignment_of(items, LAYERS, solve(cost, np.zeros_like(cost)).choice)
    assert set(bits) == {l.path for l in LAYERS}
    assert bits[f"{ATTN}/query"] == bits[f"{ATTN}/key"] == bits[f"{ATTN}/value"]
    weights = np.array([l.num_weights for l in LAYERS])
    average = sum(bits[l.path][0] * l.num_weights for l in LAYERS) / weights.sum()
    assert average <= 4.0 + 1e-9 and bits[f"{MLP}/Dense_1"] == (8, 8)


@pytest.mark.parametrize("separate", [False, True])
def test_uniform_choice_is_w_b_a_b_at_the_largest_candidate_within_the_budget(separate):
    config = LampQConfig(separate_weight_act_bits=separate)
    items = build_items(LAYERS, config)
    allowed = allowed_options(items, LAYERS, config)
    for budget, b in ((4.0, 4), (4.5, 4), (2.5, 2), (8.0, 8)):
        choice = uniform_choice(items, allowed, config, budget)
        assert set(assignment_of(items, LAYERS, choice).values()) == {(b, b)}, budget
    assert uniform_choice(items, allowed, config, 1.5) is None  # below every candidate
    assert uniform_choice(items, allowed, LampQConfig(budget_kind="model_bytes"), 4.0) is None
    bops = LampQConfig(budget_kind="bops", separate_weight_act_bits=separate)
    assert set(assignment_of(items, LAYERS, uniform_choice(items, allowed, bops, 5.0)).values()) == {(5, 5)}
    fixed = LampQConfig(separate_weight_act_bits=separate, fixed_layers=((f"{ATTN}/out", 8),))
    assert uniform_choice(items, allowed_options(items, LAYERS, fixed), fixed, 4.0) is None  # out may not take 4
