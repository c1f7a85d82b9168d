import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from lampq_jax import find_layers
from lampq_jax.apply import QuantSpec, calibrate_activations, find_attention_paths
from lampq_jax.apply.dynamic import DynamicBits, dynamic_apply, dynamic_bits
from lampq_jax.apply.fake import quant_point
from lampq_jax.apply.static import static_module
from lampq_jax.apply import compiled
from lampq_jax.sensitivity import fisher_traces
from lampq_jax.sensitivity.fisher import _fisher_pass
from lampq_jax.sensitivity.metric import activation_errors

MID = "Transformer/encoderblock_1/MlpBlock_0/Dense_0"


@pytest.fixture(scope="module")
def setup(tiny_setup):
    model, variables, images = tiny_setup
    images = images[:6]
    labels = jnp.array([0, 3, 1, 7, 2, 9])
    layers = find_layers(model, variables, images[:1])
    return model, variables, images, labels, layers


def quantized_point(setup, bits):
    """(attention paths, activation quantizers, spec, QuantPoint) of every layer at W`bits`A`bits`, attention at 4."""
    model, variables, images, _, layers = setup
    attention = find_attention_paths(model, variables, images[:1])
    act_params = calibrate_activations(model, variables, images)
    spec = QuantSpec.build(layers, {l.path: (bits, bits) for l in layers}, attention_bits={a: 4 for a in attention})
    return attention, act_params, spec, quant_point(variables, layers, spec, act_params)


def loop_traces(model, variables, images, labels, layers):
    """Independent reference: one jax.grad per sample, squared norms of the kernel gradients."""

    def loss(params, x, y):
        logits = model.apply({"params": params}, x[None])
        return jax.nn.log_softmax(logits[0])[y]

    grad = jax.jit(jax.grad(loss))
    sums = {l.path: 0.0 for l in layers}
    for x, y in zip(images, labels):
        g = flatten_dict(grad(variables["params"], x, y), sep="/")
        for l in layers:
            sums[l.path] += float(jnp.sum(g[f"{l.path}/kernel"] ** 2))
    return {p: s / len(images) for p, s in sums.items()}


def perturbation_trace(model, variables, images, labels, path):
    """Independent reference: gradient w.r.t. an explicit perturbation added to one layer's input."""

    def loss(delta, x, y):
        def add(next_fun, args, kwargs, context):
            if context.method_name == "__call__" and "/".join(context.module.scope.path) == path:
                args = (args[0] + delta,) + args[1:]
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(add):
            logits = model.apply(variables, x[None])
        return jax.nn.log_softmax(logits[0])[y]

    shape = (1, 17, 32)
    grads = [jax.grad(loss)(jnp.zeros(shape), x, y) for x, y in zip(images, labels)]
    return float(np.mean([jnp.sum(g**2) for g in grads]))


def test_vmapped_weight_traces_equal_per_sample_loop(setup):
    model, variables, images, labels, layers = setup
    traces = fisher_traces(model, variables, images, layers, labels=labels, batch_size=4)
    reference = loop_traces(model, variables, images, labels, layers)
    for l in layers:
        np.testing.assert_allclose(traces.weight[l.path], reference[l.path], rtol=1e-5, err_msg=l.path)
    assert traces.num_samples == 6


def test_activation_traces_equal_explicit_perturbation(setup):
    model, variables, images, labels, layers = setup
    traces = fisher_traces(model, variables, images, layers, labels=labels, batch_size=3)
    mid = perturbation_trace(model, variables, images, labels, MID)
    np.testing.assert_allclose(traces.activation[MID], mid, rtol=1e-5)
    # the embedding's input is the image itself
    grad_x = jax.vmap(jax.grad(lambda x, y: jax.nn.log_softmax(model.apply(variables, x[None])[0])[y]))(images, labels)
    np.testing.assert_allclose(
        traces.activation["embedding"], float(jnp.mean(jnp.sum(grad_x**2, axis=(1, 2, 3)))), rtol=1e-5
    )


def test_chunk_size_does_not_change_the_result(setup):
    model, variables, images, labels, layers = setup
    a = fisher_traces(model, variables, images, layers, labels=labels, batch_size=1)
    b = fisher_traces(model, variables, images, layers, labels=labels, batch_size=4)  # 6 = 4 + remainder 2
    for p in a.weight:
        np.testing.assert_allclose(a.weight[p], b.weight[p], rtol=1e-5)
        np.testing.assert_allclose(a.activation[p], b.activation[p], rtol=1e-5)


def test_true_fisher_targets_come_from_rng(setup):
    model, variables, images, _, layers = setup
    run = lambda seed: fisher_traces(model, variables, images, layers, rng=jax.random.key(seed), batch_size=6)
    a, b, c = run(0), run(0), run(1)
    assert a.weight == b.weight and a.activation == b.activation
    assert a.weight != c.weight
    with pytest.raises(ValueError, match="needs rng"):
        fisher_traces(model, variables, images, layers)


def test_features_and_custom_likelihood(setup):
    model, variables, images, labels, layers = setup
    feats = fisher_traces(model, variables, images, layers, rng=jax.random.key(0), output="features", batch_size=6)
    assert all(v > 0 for v in feats.weight.values())
    custom = fisher_traces(
        model,
        variables,
        images,
        layers,
        labels=labels,
        batch_size=6,
        log_likelihood=lambda out, y: jax.nn.log_softmax(out.reshape(-1))[y],
    )
    empirical = fisher_traces(model, variables, images, layers, labels=labels, batch_size=6)
    for p in custom.weight:
        np.testing.assert_allclose(custom.weight[p], empirical.weight[p], rtol=1e-6)
    with pytest.raises(ValueError, match="labels have 2 entries for 6 images"):
        fisher_traces(model, variables, images, layers, labels=labels[:2])


def test_fisher_at_a_quantized_point(setup):
    model, variables, images, labels, layers = setup
    attention, act_params, spec, point = quantized_point(setup, 3)
    fp = fisher_traces(model, variables, images, layers, labels=labels, batch_size=6)
    q = fisher_traces(model, variables, images, layers, labels=labels, batch_size=6, quant=point)
    assert all(np.isfinite(v) and v > 0 for v in q.weight.values())
    rel = [abs(q.weight[p] - fp.weight[p]) / fp.weight[p] for p in fp.weight]
    assert max(rel) > 0.01  # the quantized point has its own sensitivities


def test_targets_drawn_in_the_pass_equal_those_around_given_outputs(setup):
    """Without outputs the pass draws its targets around its own outputs (no forward before it) with the same
    noise as `sample_targets` around given outputs, and returns those outputs."""
    model, variables, images, _, layers = setup
    attention, act_params, spec, point = quantized_point(setup, 4)
    for quant in (None, point):
        outputs = dynamic_apply(
            variables if quant is None else quant.variables,
            DynamicBits({}, {}, {})
            if quant is None
            else dynamic_bits(act_params, attention, spec.bits, dict(spec.attention)),
            images,
            model=static_module(model),
            kwargs=(),
        )
        run = lambda **kw: fisher_traces(
            model, variables, images, layers, rng=jax.random.key(0), batch_size=4, quant=quant, **kw
        )
        own, given = run(), run(outputs=outputs)
        np.testing.assert_allclose(own.outputs, outputs, rtol=1e-5, atol=1e-6)
        assert own.weight == given.weight and own.activation == given.activation  # the same classes drawn
        features = lambda **kw: run(output="features", **kw)
        own_f, given_f = features(), features(outputs=outputs)
        for p in own_f.weight:  # y = f + ε: the pass's f and the given f differ by float rounding only
            np.testing.assert_allclose(own_f.weight[p], given_f.weight[p], rtol=1e-4)
            np.testing.assert_allclose(own_f.activation[p], given_f.activation[p], rtol=1e-4)
        shifted = run(outputs=outputs[::-1])  # the targets are drawn from the given outputs
        assert shifted.weight != own.weight
    with pytest.raises(ValueError, match="outputs have 2 rows for 6 images"):
        run(outputs=outputs[:2])


def test_input_errors_from_the_fisher_pass_equal_their_own_pass(setup):
    model, variables, images, labels, layers = setup
    attention, act_params, spec, point = quantized_point(setup, 3)
    candidates = (2, 4, 8)
    for quant in (None, point):
        common = dict(quant=quant, batch_size=4)
        fused = fisher_traces(
            model, variables, images, layers, labels=labels, act_params=act_params, candidates=candidates, **common
        )
        alone = activation_errors(model, variables, images, layers, act_params, candidates, quant=quant)
        np.testing.assert_allclose(np.stack([fused.input_errors[l.path] for l in layers]), alone, rtol=1e-5)
        plain = fisher_traces(model, variables, images, layers, labels=labels, **common)
        # the float pass with act_params runs through the traced-bits interceptor at 0 bits: float rounding apart
        for p in plain.weight:
            np.testing.assert_allclose(fused.weight[p], plain.weight[p], rtol=1e-5)
            np.testing.assert_allclose(fused.activation[p], plain.activation[p], rtol=1e-5)
    with pytest.raises(ValueError, match="need both act_params and candidates"):
        fisher_traces(model, variables, images, layers, labels=labels, candidates=candidates)
    with pytest.raises(ValueError, match="no calibrated activation range"):
        fisher_traces(model, variables, images, layers, labels=labels, act_params={}, candidates=candidates)


def test_the_float_pass_and_quantized_passes_share_one_compilation(setup):
    model, variables, images, labels, layers = setup
    attention, act_params, _, point3 = quantized_point(setup, 3)
    *_, point5 = quantized_point(setup, 5)
    compiled.clear()
    common = dict(labels=labels, batch_size=3, act_params=act_params, candidates=(2, 4))
    for quant in (None, point3, point5):
        fisher_traces(model, variables, images, layers, quant=quant, **common)
    passes = [fn for key, fn in compiled._table.items() if key[0] is _fisher_pass]
    assert len(passes) == 1 and passes[0]._cache_size() == 1


def test_batched_backward_equals_vmap_grad(setup):
    model, variables, images, labels, layers = setup
    dense = [l for l in layers if l.kind != "conv"]  # the patch embedding is a Conv: not batchable
    attention, act_params, spec, point = quantized_point(setup, 3)
    for quant in (None, point):
        common = dict(labels=labels, batch_size=4, quant=quant, act_params=act_params, candidates=(2, 4, 8))
        batched = fisher_traces(model, variables, images, dense, **common)
        reference = fisher_traces(model, variables, images, dense, method="vmap", **common)
        assert (batched.method, reference.method) == ("batched", "vmap")
        for p in reference.weight:
            np.testing.assert_allclose(batched.weight[p], reference.weight[p], rtol=1e-5)
            np.testing.assert_allclose(batched.activation[p], reference.activation[p], rtol=1e-5)
            np.testing.assert_allclose(batched.input_errors[p], reference.input_errors[p], rtol=1e-5)
    true_fisher = dict(rng=jax.random.key(3), output="features", batch_size=5)  # 6 samples: a padded last chunk
    batched = fisher_traces(model, variables, images, dense, **true_fisher)
    reference = fisher_traces(model, variables, images, dense, method="vmap", **true_fisher)
    for p in reference.weight:
        np.testing.assert_allclose(batched.weight[p], reference.weight[p], rtol=1e-5)


def test_batched_falls_back_to_vmap_for_a_layer_it_cannot_take(setup):
    model, variables, images, labels, layers = setup
    from lampq_jax.sensitivity.fisher import batchable

    assert [l.path for l in layers if not batchable(l)] == ["embedding"]
    traces = fisher_traces(model, variables, images, layers, labels=labels, batch_size=6)
    assert traces.method == "vmap" and set(traces.weight) == {l.path for l in layers}
    with pytest.raises(ValueError, match="method must be one of \\('batched', 'vmap'\\), got 'loop'"):
        fisher_traces(model, variables, images, layers, labels=labels, method="loop")
