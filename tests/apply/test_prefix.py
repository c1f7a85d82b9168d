import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lampq_jax import find_layers
from lampq_jax.apply import calibrate_activations, compiled, find_attention_paths
from lampq_jax.apply import prefix
from lampq_jax.apply.dynamic import DynamicQuantizer, _skipping_forward
from lampq_jax.apply.prefix import PrefixRunner, skip_flags


@pytest.fixture(scope="module")
def runner_setup(tiny_setup):
    model, variables, images = tiny_setup
    images = np.asarray(images[:10])
    layers = find_layers(model, variables, images[:1])
    attention = find_attention_paths(model, variables, images[:1])
    quantizer = DynamicQuantizer(model, variables, layers, attention, calibrate_activations(model, variables, images))
    return quantizer, layers, attention, images


def plain_outputs(quantizer, images, bits, attention_bits=None, batch=4):
    return np.concatenate(
        [
            np.asarray(quantizer.apply(jnp.asarray(images[i : i + batch]), bits, attention_bits))
            for i in range(0, len(images), batch)
        ]
    )


def test_cut_modules_are_the_attention_and_mlp_blocks_in_call_order(runner_setup):
    quantizer, *_, images = runner_setup
    runner = PrefixRunner.build(quantizer, images, 4, None)
    blocks = [
        f"Transformer/encoderblock_{i}/{m}" for i in (0, 1) for m in ("MultiHeadDotProductAttention_0", "MlpBlock_0")
    ]
    assert runner.cuts == tuple(blocks)


def test_probes_equal_the_plain_forward_and_skip_more_the_later_the_layer(runner_setup):
    quantizer, layers, attention, images = runner_setup
    runner = PrefixRunner.build(quantizer, images, 4, None)
    skipped = []
    for layer in layers:
        bits = {layer.path: (3, 3)}
        np.testing.assert_array_equal(runner.outputs(bits), plain_outputs(quantizer, images, bits))
        skipped.append(sum(skip_flags(runner.spans, runner.cuts, bits).values()))
    assert skipped == sorted(skipped) and skipped[0] == 0 and skipped[-1] == len(runner.cuts)
    every = {l.path: (4, 4) for l in layers}
    attention_bits = {a: 4 for a in attention}
    np.testing.assert_array_equal(
        runner.outputs(every, attention_bits), plain_outputs(quantizer, images, every, attention_bits)
    )


def test_a_skipped_module_returns_the_cache_instead_of_running(runner_setup):
    quantizer, layers, _, images = runner_setup
    runner = PrefixRunner.build(quantizer, images, 4, None)
    first, last = {layers[0].path: (3, 3)}, {layers[-1].path: (3, 3)}
    runner.outputs(last)  # fills the float cache
    runner._cached = [jax.tree.map(jnp.zeros_like, c) for c in runner._cached]
    np.testing.assert_array_equal(runner.outputs(first), plain_outputs(quantizer, images, first))  # skips nothing
    assert not np.allclose(runner.outputs(last), plain_outputs(quantizer, images, last))  # used the zeros


def test_float_outputs_are_the_models_and_fill_the_cache(runner_setup, monkeypatch):
    """`float_outputs` gives the full-precision outputs from the forward that fills the cache; a probe after it runs
    one forward per batch, not a float one first."""
    quantizer, layers, _, images = runner_setup
    runner = PrefixRunner.build(quantizer, images, 4, None)
    model, variables = quantizer.model, quantizer.variables
    reference = np.asarray(jax.jit(lambda x: model.apply(variables, x))(jnp.asarray(images)))
    np.testing.assert_allclose(runner.float_outputs(), reference, rtol=1e-5, atol=1e-5)
    assert runner._cached is not None and len(runner._cached) == 3  # 10 images, 4 a batch
    np.testing.assert_array_equal(runner.float_outputs(), plain_outputs(quantizer, images, {}))
    calls = []
    apply_skipping = DynamicQuantizer.apply_skipping
    monkeypatch.setattr(
        DynamicQuantizer, "apply_skipping", lambda self, *a: calls.append(1) or apply_skipping(self, *a)
    )
    last = {layers[-1].path: (3, 3)}
    np.testing.assert_array_equal(runner.outputs(last), plain_outputs(quantizer, images, last))
    assert len(calls) == 3


def test_one_compilation_serves_every_assignment(runner_setup):
    quantizer, layers, _, images = runner_setup
    compiled.clear()
    runner = PrefixRunner.build(quantizer, images, 5, None)
    for layer in layers[::3]:
        runner.outputs({layer.path: (2, 4)})
    runner.outputs({l.path: (4, 4) for l in layers})
    forwards = [fn for key, fn in compiled._table.items() if key[0] is _skipping_forward]
    assert len(forwards) == 1 and forwards[0]._cache_size() == 1


def test_skip_flags_count_attention_sites_and_name_unknown_paths(runner_setup):
    quantizer, layers, attention, images = runner_setup
    runner = PrefixRunner.build(quantizer, images, 4, None)
    late = {layers[-1].path: (3, 3)}
    assert skip_flags(runner.spans, runner.cuts, late, {attention[0]: 0}) == {c: True for c in runner.cuts}
    flags = skip_flags(runner.spans, runner.cuts, late, {attention[0]: 4})
    assert not any(flags.values())  # the first attention's q·kᵀ is quantized: nothing before it to skip
    with pytest.raises(ValueError, match="does not call module path.*nowhere/Dense_0"):
        skip_flags(runner.spans, runner.cuts, {"nowhere/Dense_0": (3, 3)})


class FlatMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3)(nn.relu(nn.Dense(8)(x.reshape(x.shape[0], -1))))


def test_no_runner_without_cut_modules_or_beyond_the_cache_bound(runner_setup, monkeypatch):
    quantizer, *_, images = runner_setup
    x = np.ones((4, 5), np.float32)
    model = FlatMLP()
    variables = model.init(jax.random.key(0), x)
    layers = find_layers(model, variables, x[:1], rules=[("Dense_0", "fc1"), ("Dense_1", "fc2")])
    flat = DynamicQuantizer(model, variables, layers, [], calibrate_activations(model, variables, x))
    assert PrefixRunner.build(flat, x, 4, None) is None  # every layer sits at the root
    monkeypatch.setattr(prefix, "MAX_CACHE_BYTES", 1000)
    assert PrefixRunner.build(quantizer, images, 4, None) is None
