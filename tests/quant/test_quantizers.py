"""Properties and pinned figures of the quantizers in lampq_jax.quant."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lampq_jax import quant as q

ALL_BITS = tuple(range(q.MIN_BITS, q.MAX_BITS + 1))


def sq_error(x, x_hat):
    d = np.asarray(x_hat, np.float64) - np.asarray(x, np.float64)
    return float(np.sum(d * d))


def normal(seed, shape):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


@pytest.fixture(scope="module")
def gaussian():
    return normal(0, (4096,))


@pytest.fixture(scope="module")
def heavy_tailed():
    return np.random.default_rng(1).standard_t(4.0, (4096,)).astype(np.float32)  # Student t, 4 dof


# ---------------------------------------------------------------- bit-width validation


def test_check_bits_accepts_2_to_8():
    assert [q.check_bits(b) for b in ALL_BITS] == list(ALL_BITS)
    assert q.check_bits(np.int64(4)) == 4
    assert [q.num_levels(b) for b in (2, 4, 8)] == [3, 15, 255]


BAD_BITS = [1, 9, 4.5, 0, -3]
X_SMALL = np.linspace(-1.0, 1.0, 16, dtype=np.float32)
P_SMALL = q.UniformParams(np.float32(0.1), np.float32(8.0))
CALLS_WITH_BITS = {
    "check_bits": lambda b: q.check_bits(b),
    "minmax_params": lambda b: q.minmax_params(X_SMALL, b),
    "search_clipping_params": lambda b: q.search_clipping_params(X_SMALL, b),
    "quantize": lambda b: q.quantize(X_SMALL, P_SMALL, b),
    "fake_quant": lambda b: q.fake_quant(X_SMALL, P_SMALL, b),
    "fake_quant_ste": lambda b: q.fake_quant_ste(X_SMALL, P_SMALL, b),
    "quant_errors": lambda b: q.quant_errors(X_SMALL, [4, b]),
}


@pytest.mark.parametrize("name", sorted(CALLS_WITH_BITS))
@pytest.mark.parametrize("bits", BAD_BITS)
def test_bad_bits_raise_naming_value(name, bits):
    with pytest.raises(ValueError, match=re.escape(f"got {bits}")):
        CALLS_WITH_BITS[name](bits)


def test_bool_and_traced_bits_raise():
    with pytest.raises(ValueError, match="True"):
        q.check_bits(True)
    with pytest.raises(ValueError, match="static"):
        jax.jit(lambda x, b: q.fake_quant(x, P_SMALL, b))(X_SMALL, 4)


# ---------------------------------------------------------------- uniform quantizer


def test_8bit_gaussian_relative_error_below_one_percent(gaussian):
    x_hat = q.fake_quant(gaussian, q.minmax_params(gaussian, 8), 8)
    rel = np.sqrt(sq_error(gaussian, x_hat) / float(np.sum(gaussian**2)))
    # Uniform noise model: step ≈ 7.3σ / 255, rms error ≈ step / √12 ≈ 0.0083σ.
    assert 0.006 < rel < 0.01, rel


def test_error_strictly_decreasing_and_about_4x_per_bit(gaussian):
    for search in (True, False):
        errors = np.asarray(q.quant_errors(gaussian, ALL_BITS, search=search))
        assert np.all(np.diff(errors) < 0), (search, errors)
    minmax = np.asarray(q.quant_errors(gaussian, ALL_BITS, search=False))
    ratios = minmax[2:-1] / minmax[3:]  # e_b / e_{b+1} for b = 4..7: 6 dB per bit
    assert np.all((ratios > 3.6) & (ratios < 4.4)), ratios


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_codes_in_range_int32_and_roundtrip(gaussian, bits):
    x = gaussian.reshape(64, 64)
    params = q.search_clipping_params(x, bits, reduce_axes=(0,))
    codes = q.quantize(x, params, bits)
    assert codes.dtype == jnp.int32 and codes.shape == x.shape
    assert int(codes.min()) == 0 and int(codes.max()) == 2**bits - 1  # clipping hits both ends
    np.testing.assert_array_equal(q.dequantize(codes, params), q.fake_quant(x, params, bits))
    assert params.scale.shape == params.zero_point.shape == (1, 64)
    zp = np.asarray(params.zero_point)
    assert np.all(zp == np.round(zp)) and zp.min() >= 0 and zp.max() <= 2**bits - 1


def test_zero_is_exact_and_all_zero_slices_are_safe():
    x = np.concatenate([np.zeros(4), np.linspace(0.3, 2.0, 12)]).astype(np.float32)  # all >= 0: range still holds 0
    for bits in (2, 5):
        params = q.minmax_params(x, bits)
        assert params.zero_point.item() == 0.0
        assert np.all(np.asarray(q.fake_quant(x, params, bits))[:4] == 0.0)
    z = np.zeros((3, 5), np.float32)
    params = q.search_clipping_params(z, 4, reduce_axes=(1,))
    np.testing.assert_array_equal(q.fake_quant(z, params, 4), z)
    assert np.all(np.asarray(params.scale) > 0)


def test_per_channel_beats_per_tensor_on_uneven_channels():
    w = normal(2, (128, 16)) * np.logspace(-2, 1, 16, dtype=np.float32)  # scales 0.01..10
    energy = np.sum(w**2, axis=0)

    def channel_errors(reduce_axes):
        w_hat = q.fake_quant(w, q.minmax_params(w, 4, reduce_axes=reduce_axes), 4)
        return np.sum((np.asarray(w_hat) - np.asarray(w)) ** 2, axis=0) / energy

    per_tensor, per_channel = channel_errors(None), channel_errors((0,))
    # Per tensor, the ten smallest channels round to zero entirely; per channel, every channel
    # keeps the 4-bit Gaussian figure of about 1% relative squared error.
    np.testing.assert_array_equal(per_tensor[:10], 1.0)
    assert np.all(per_channel < 0.02), per_channel
    total = [float(q.quant_errors(w, [4], reduce_axes=a, search=False)[0]) for a in ((0,), None)]
    assert total[0] < 0.5 * total[1], total


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_inputs_keep_dtype(gaussian, dtype):
    x = jnp.asarray(gaussian, dtype)
    params = q.minmax_params(x, 6)
    assert params.scale.dtype == jnp.float32
    for out in (q.fake_quant(x, params, 6), q.fake_quant_ste(x, params, 6)):
        assert out.dtype == dtype
    f32 = float(q.quant_errors(gaussian, [6])[0])
    low = float(q.quant_errors(x, [6])[0])
    assert low == pytest.approx(f32, rel=0.1)


def test_integer_input_rejected():
    with pytest.raises(TypeError, match="int32"):
        q.minmax_params(jnp.arange(4, dtype=jnp.int32), 4)


# ---------------------------------------------------------------- clipping search


@pytest.mark.parametrize("reduce_axes", [None, (0,)])
def test_search_never_worse_than_minmax(gaussian, heavy_tailed, reduce_axes):
    for x in (gaussian.reshape(256, 16), heavy_tailed.reshape(256, 16)):
        search = np.asarray(q.quant_errors(x, ALL_BITS, reduce_axes=reduce_axes, search=True))
        minmax = np.asarray(q.quant_errors(x, ALL_BITS, reduce_axes=reduce_axes, search=False))
        assert np.all(search <= minmax * (1 + 1e-6)), (search, minmax)


def test_search_strictly_better_on_heavy_tails_at_low_bits(heavy_tailed):
    low = (2, 3, 4)
    search = np.asarray(q.quant_errors(heavy_tailed, low, search=True))
    minmax = np.asarray(q.quant_errors(heavy_tailed, low, search=False))
    assert np.all(search < 0.6 * minmax), search / minmax  # pinned: 0.50, 0.26, 0.34


def test_search_picks_ratio_from_grid(heavy_tailed):
    x = heavy_tailed
    full = q.minmax_params(x, 3)
    chosen = q.search_clipping_params(x, 3, grid=(0.5, 0.75))
    ratio = (chosen.scale / full.scale).item()
    assert min(abs(ratio - r) for r in (0.5, 0.75, 1.0)) < 1e-6, ratio
    only_one = q.search_clipping_params(x, 3, grid=(1.0,))
    np.testing.assert_array_equal(only_one.scale, full.scale)
    np.testing.assert_array_equal(only_one.zero_point, full.zero_point)


@pytest.mark.parametrize("grid", [(), (0.0,), (0.5, 1.5), (-0.2,)])
def test_bad_grid_raises(grid):
    with pytest.raises(ValueError, match="grid"):
        q.search_clipping_params(X_SMALL, 4, grid=grid)


@pytest.mark.parametrize("search", [True, False])
def test_quant_errors_equals_loop(heavy_tailed, search):
    w = heavy_tailed.reshape(64, 4, 16)
    axes = q.weight_reduce_axes(3, (1, 2))
    bits_list = (8, 2, 4, 3)
    errors = np.asarray(q.quant_errors(w, bits_list, reduce_axes=axes, search=search))
    make = q.search_clipping_params if search else q.minmax_params
    loop = [sq_error(w, q.fake_quant(w, make(w, b, reduce_axes=axes), b)) for b in bits_list]
    np.testing.assert_allclose(errors, loop, rtol=1e-5)
    assert errors.shape == (4,)
    with pytest.raises(ValueError, match="bits_list"):
        q.quant_errors(w, [])


# ---------------------------------------------------------------- kernels of Flax layers

KERNELS = [
    # shape, out_axes, expected reduce axes
    ((24, 32), (1,), (0,)),  # Dense [in, out]
    ((32, 4, 8), (1, 2), (0,)),  # DenseGeneral query [dim, heads, head_dim]
    ((4, 8, 32), (2,), (0, 1)),  # DenseGeneral out [heads, head_dim, dim]
    ((3, 3, 4, 8), (-1,), (0, 1, 2)),  # Conv [kh, kw, cin, cout]
]


@pytest.mark.parametrize("shape,out_axes,expected", KERNELS)
def test_kernel_layouts(shape, out_axes, expected):
    axes = q.weight_reduce_axes(len(shape), out_axes)
    assert axes == expected
    w = normal(3, shape) * np.logspace(-1, 1, shape[-1], dtype=np.float32)
    params = q.search_clipping_params(w, 4, reduce_axes=axes)
    kept = tuple(1 if a in axes else n for a, n in enumerate(shape))
    assert params.scale.shape == kept
    searched = sq_error(w, q.fake_quant(w, params, 4))
    per_channel, per_tensor = (float(q.quant_errors(w, [4], reduce_axes=a, search=False)[0]) for a in (axes, None))
    assert searched <= per_channel * (1 + 1e-6) and per_channel < 0.5 * per_tensor


@pytest.mark.parametrize(
    "ndim,out_axes,needle",
    [(3, (3,), "(3,)"), (2, (0, -2), "(0, -2)"), (2, (), "()"), (0, (0,), "kernel_ndim must be a positive int, got 0")],
)
def test_weight_reduce_axes_validation(ndim, out_axes, needle):
    with pytest.raises(ValueError, match=re.escape(needle)):
        q.weight_reduce_axes(ndim, out_axes)


def test_reduce_axes_validation():
    with pytest.raises(ValueError, match=re.escape("reduce_axes=(2,)")):
        q.minmax_params(np.ones((3, 4), np.float32), 4, reduce_axes=(2,))
    assert q.minmax_params(np.ones((3, 4), np.float32), 4, reduce_axes=-2).scale.shape == (1, 4)


# ---------------------------------------------------------------- straight-through estimator


def test_uniform_ste_gradient_is_mask_of_range():
    params = q.UniformParams(np.full((1, 3), 0.1, np.float32), np.asarray([[8.0, 0.0, 15.0]], np.float32))
    bits = 4
    lo = -params.zero_point * params.scale  # [-0.8, 0, -1.5], float32 as in the quantizer
    hi = (np.float32(15.0) - params.zero_point) * params.scale  # [0.7, 1.5, 0]
    grid = np.linspace(-2.0, 2.0, 41, dtype=np.float32)[:, None] * np.ones((1, 3), np.float32) + np.float32(0.013)
    x = np.concatenate([grid, lo, hi])
    y = q.fake_quant_ste(x, params, bits)
    np.testing.assert_array_equal(y, q.fake_quant(x, params, bits))
    grad = np.asarray(jax.grad(lambda v: q.fake_quant_ste(v, params, bits).sum())(x))
    inside = (x >= lo) & (x <= hi)
    assert set(np.unique(grad)) == {0.0, 1.0}
    np.testing.assert_array_equal(grad, inside.astype(np.float32))
    assert np.all(grad[-2:] == 1.0)  # the range's endpoints count as inside
    _, tangent = jax.jvp(lambda v: q.fake_quant_ste(v, params, bits), (x,), (np.ones_like(x),))
    np.testing.assert_array_equal(tangent, inside.astype(np.float32))
    grad_params = jax.grad(lambda p: q.fake_quant_ste(x, p, bits).sum())(params)
    assert np.all(np.asarray(grad_params.scale) == 0.0)


def test_uniform_ste_bfloat16_gradient():
    x = jnp.linspace(-1.0, 1.0, 9, dtype=jnp.bfloat16)
    params = q.UniformParams(jnp.float32(0.05), jnp.float32(4.0))  # range [-0.2, 0.55]
    grad = jax.grad(lambda v: q.fake_quant_ste(v, params, 4).astype(jnp.float32).sum())(x)
    assert grad.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(grad, np.float32), [0, 0, 0, 0, 1, 1, 1, 0, 0])


# ---------------------------------------------------------------- jit


def test_jit_with_static_bits_does_not_retrace(gaussian):
    traces = []

    @functools.partial(jax.jit, static_argnames=("bits",))
    def weight_fake_quant(w, bits):
        traces.append(bits)
        return q.fake_quant(w, q.search_clipping_params(w, bits, reduce_axes=(0,)), bits)

    w = gaussian.reshape(256, 16)
    first = weight_fake_quant(w, bits=4)
    weight_fake_quant(w * 2.0, bits=4)
    weight_fake_quant(w + 1.0, bits=4)
    assert traces == [4]
    weight_fake_quant(w, bits=3)
    assert traces == [4, 3]
    eager = q.fake_quant(w, q.search_clipping_params(w, 4, reduce_axes=(0,)), 4)
    np.testing.assert_allclose(first, eager, rtol=0, atol=1e-6)

    errors = jax.jit(q.quant_errors, static_argnames=("bits_list", "reduce_axes", "search"))
    e1 = errors(w, (2, 4, 8), reduce_axes=(0,))
    errors(w * 3.0, (2, 4, 8), reduce_axes=(0,))
    assert errors._cache_size() == 1
    np.testing.assert_allclose(e1, q.quant_errors(w, (2, 4, 8), reduce_axes=(0,)), rtol=1e-6)
