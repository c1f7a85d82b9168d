import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lampq_jax
from lampq_jax import find_layers
from lampq_jax.apply import (
    QuantSpec,
    activation_interceptor,
    calibrate_activations,
    fake_quantize_params,
    find_attention_paths,
    quantized_apply,
)


def rel_err(a, b):
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


@pytest.fixture(scope="module")
def calibrated(tiny_setup):
    model, variables, images = tiny_setup
    layers = find_layers(model, variables, images[:1])
    attention = find_attention_paths(model, variables, images[:1])
    act_params = calibrate_activations(model, variables, images)
    return layers, attention, act_params


def test_sites_cover_layers_and_attention(tiny_setup, calibrated):
    layers, attention, act_params = calibrated
    assert attention == [f"Transformer/encoderblock_{i}/MultiHeadDotProductAttention_0" for i in range(2)]
    expected = {l.path for l in layers} | {f"{a}/{s}" for a in attention for s in "qkv"}
    assert set(act_params) == expected
    for table in act_params.values():
        assert table.shape == (9, 2) and np.all(table[2:, 0] > 0) and np.isnan(table[:2]).all()


def test_error_falls_with_bits(tiny_setup):
    model, variables, images = tiny_setup
    fp = model.apply(variables, images)
    errors = [rel_err(lampq_jax.quantize_uniform(model, variables, images, b).apply(images), fp) for b in range(2, 9)]
    assert all(a > b for a, b in zip(errors, errors[1:])), errors


def test_weights_are_quantized_once_and_per_channel(tiny_setup, calibrated):
    model, variables, images = tiny_setup
    layers, _, _ = calibrated
    spec = QuantSpec.build(layers, {l.path: (2, 8) for l in layers})
    qvars = fake_quantize_params(variables, layers, spec)
    kernel = qvars["params"]["Transformer"]["encoderblock_0"]["MlpBlock_0"]["Dense_0"]["kernel"]
    # per output channel: at most 2^2 distinct values in each column
    assert max(len(np.unique(np.asarray(kernel[:, j]))) for j in range(kernel.shape[1])) <= 4
    assert len(np.unique(np.asarray(kernel))) > 4


def test_unknown_path_and_bad_bits_are_errors(calibrated):
    layers, _, _ = calibrated
    with pytest.raises(ValueError, match="no/such/layer"):
        QuantSpec.build(layers, {"no/such/layer": (4, 4)})
    path = layers[1].path
    with pytest.raises(ValueError, match=r"\(9, 4\)"):
        QuantSpec.build(layers, {path: (9, 4)})
    with pytest.raises(ValueError, match=r"\(4, 1\)"):
        QuantSpec.build(layers, {path: (4, 1)})
    with pytest.raises(ValueError, match="bits"):
        lampq_jax.quantize_uniform(None, None, np.zeros([2, 28, 28, 1]), 12)


def test_bad_calibration_images_are_errors(tiny_setup):
    model, variables, images = tiny_setup
    bad = np.array(images)
    bad[3, 1, 2, 0] = np.nan
    with pytest.raises(ValueError, match=r"NaN/Inf value\(s\), first at index \(3, 1, 2, 0\)"):
        lampq_jax.quantize_uniform(model, variables, bad, 4)
    with pytest.raises(ValueError, match="empty"):
        lampq_jax.quantize_uniform(model, variables, images[:0], 4)


def test_jitted_apply_traces_once(tiny_setup):
    model, variables, images = tiny_setup
    result = lampq_jax.quantize_uniform(model, variables, images, 4, train=False)
    outs = [result.apply(images) for _ in range(3)]
    compiled = result.quantized._run
    assert compiled._cache_size() == 1
    np.testing.assert_array_equal(outs[0], outs[2])
    result.apply(images, train=False)  # the same keyword set: same trace
    assert compiled._cache_size() == 1


def test_vmap_and_grad_through_quantized_apply(tiny_setup, calibrated):
    model, variables, images = tiny_setup
    layers, attention, act_params = calibrated
    spec = QuantSpec.build(layers, {l.path: (4, 4) for l in layers}, attention_bits={a: 4 for a in attention})
    fn = quantized_apply(model, layers, spec, act_params, ste=True)
    batched = jax.jit(fn)(variables, images[:4])
    per_example = jax.vmap(lambda x: fn(variables, x[None])[0])(images[:4])
    np.testing.assert_allclose(per_example, batched, atol=1e-5)

    def loss(v):
        return jnp.mean(jax.nn.log_softmax(fn(v, images))[:, 0])

    grads = jax.grad(loss)(variables)
    leaves = jax.tree.leaves(grads)
    assert all(np.isfinite(g).all() for g in leaves)
    dense0 = grads["params"]["Transformer"]["encoderblock_0"]["MlpBlock_0"]["Dense_0"]["kernel"]
    assert float(jnp.abs(dense0).sum()) > 0
    # STE output equals the inference path (weights quantized once + interceptor)
    qvars = fake_quantize_params(variables, layers, spec)
    with nn.intercept_methods(activation_interceptor(spec, act_params)):
        reference = model.apply(qvars, images[:4])
    np.testing.assert_allclose(batched, reference, atol=1e-5)


def test_eight_bits_stays_within_two_percent_on_the_trained_vit():
    from lampq_jax.data.embedded import load_embedded_model, load_embedded_subset

    model, variables, _ = load_embedded_model()
    data = load_embedded_subset()
    images = data["val_images"][:256]
    fp = model.apply(variables, images, train=False)
    result = lampq_jax.quantize_uniform(model, variables, data["calib_images"][:32], 8, train=False)
    assert rel_err(result.apply(images), fp) < 0.02


def test_softmax_quantizer_levels_follow_bits_and_keys():
    from lampq_jax.quant.traced import SOFTMAX_FLOOR_FACTOR, softmax_dynamic, softmax_log_base

    keys = 257
    rng = np.random.default_rng(0)
    w = jax.nn.softmax(jnp.asarray(rng.normal(0, 2.0, [64, keys]), jnp.float32), axis=-1)
    errors = []
    for bits in range(2, 9):
        k = float(softmax_log_base(bits, keys))
        assert k == pytest.approx((2**bits - 1) / np.log2(SOFTMAX_FLOOR_FACTOR * keys), rel=1e-6)
        q = np.asarray(softmax_dynamic(w, jnp.int32(bits)))
        levels = 2.0 ** (-np.arange(2**bits) / k)
        nearest = np.min(np.abs(q[q > 0][:, None] / levels[None, :] - 1.0), axis=1)
        assert nearest.max() < 1e-5  # every nonzero output is a level 2^(−code/k)
        assert (q[np.asarray(w) < 2.0 ** (-(2**bits - 0.5) / k)] == 0).all()  # below the floor: zero
        errors.append(float(np.sum((q - np.asarray(w)) ** 2)))
    assert all(a > b for a, b in zip(errors, errors[1:])), errors  # the error falls with every bit
    # the mass that 8 bits keep: within 1 % of each row's sum
    np.testing.assert_allclose(np.asarray(softmax_dynamic(w, jnp.int32(8))).sum(-1), 1.0, rtol=0.01)
    np.testing.assert_array_equal(softmax_dynamic(w, jnp.int32(0)), w)
    v = jnp.array([1.0, 0.5, 0.3, 0.0])
    grad = jax.grad(lambda x: softmax_dynamic(x, jnp.int32(4), ste=True).sum())(v)
    np.testing.assert_array_equal(grad, [1, 1, 1, 0])


def test_quantize_weight_compiles_once_per_kernel_shape_at_every_width():
    from lampq_jax.apply.fake import _quantize_weight, quantize_weight
    from lampq_jax.quant import quantize, search_clipping_params

    kernel = jax.random.normal(jax.random.key(0), (24, 3, 5))  # a DenseGeneral kernel [in, heads, head_dim]
    x = jax.random.normal(jax.random.key(1), (256, 24))
    hessian = x.T @ x / 256
    before = _quantize_weight._cache_size()
    for bits in range(2, 9):
        codes, grid = quantize_weight(kernel, bits, (1, 2))
        expected = quantize(kernel, search_clipping_params(kernel, bits, reduce_axes=(0,)), bits)
        np.testing.assert_array_equal(codes, expected)  # the traced levels round as the static ones
        assert int(codes.max()) <= 2**bits - 1
        gptq_codes, _ = quantize_weight(kernel, bits, (1, 2), hessian=hessian)
        assert 0 < float(jnp.mean(gptq_codes != codes)) < 0.9  # GPTQ moves some codes on the same grid
    assert _quantize_weight._cache_size() - before == 2  # one compile for RTN, one for GPTQ, all 7 widths
