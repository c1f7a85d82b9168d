"""Per-channel activation quantizers, the token output, and quantization error on a 197-token ViT."""

import jax
import numpy as np
import pytest

import lampq_jax
from lampq_jax.apply.calibration import CHANNEL_RANGE_FLOOR, calibrate_activations, channel_input_sites
from lampq_jax.layers import find_layers


@pytest.fixture(scope="module")
def tiny_vit():
    model = lampq_jax.create_vit("mu/8", None, num_layers=2, return_tokens=True)
    images = jax.random.normal(jax.random.key(0), [6, 32, 32, 3])
    variables = model.init(jax.random.key(1), images[:1], train=False)
    return model, variables, np.asarray(images)


def test_return_tokens_gives_every_token_and_checks_the_head():
    images = np.zeros([2, 32, 32, 3], np.float32)
    pooled = lampq_jax.create_vit("mu/8", None, num_layers=1)
    variables = pooled.init(jax.random.key(0), images, train=False)
    tokens = pooled.clone(return_tokens=True).apply(variables, images, train=False)
    assert tokens.shape == (2, 17, 32)
    np.testing.assert_array_equal(tokens[:, 0], pooled.apply(variables, images, train=False))
    with pytest.raises(ValueError, match="return_tokens=True .* num_classes=None"):
        lampq_jax.create_vit("mu/8", 10, num_layers=1, return_tokens=True).init(jax.random.key(0), images)


def test_channel_sites_get_per_channel_tables_that_cover_each_channel(tiny_vit):
    model, variables, images = tiny_vit
    layers = find_layers(model, variables, images[:1], train=False)
    sites = channel_input_sites(layers, ("qkv", "fc1", "fc2"))
    by_type = {l.path: l.type for l in layers}
    assert sites and {by_type[s] for s in sites} == {"qkv", "fc1", "fc2"}  # not proj: its input has 2 axes
    params = calibrate_activations(model, variables, images, method="minmax", channel_sites=sites, train=False)
    found = {}

    def record(site, x):
        found[site] = x
        return x

    from flax import linen as nn
    from lampq_jax.apply.sites import site_interceptor

    with nn.intercept_methods(site_interceptor(record)):
        model.apply(variables, images, train=False)
    for site in sites:
        x = np.asarray(found[site]).reshape(-1, found[site].shape[-1])
        table = params[site]
        assert table.shape == (9, 2, x.shape[1])
        assert CHANNEL_RANGE_FLOOR[4] == 0.0
        scale, zero = table[4, 0], table[4, 1]
        lo, hi = -zero * scale, (15 - zero) * scale  # the 4-bit grid's range, per channel
        half = scale / 2 + 1e-6  # the zero point is an integer: the grid may shift by half a step
        assert (lo <= np.minimum(x.min(0), 0) + half).all() and (hi >= np.maximum(x.max(0), 0) - half).all()
        assert np.ptp(scale) > 0  # really per channel
    others = [s for s in params if s not in sites]
    assert others and all(params[s].shape == (9, 2) for s in others)
    with pytest.raises(ValueError, match="channel_sites"):
        calibrate_activations(model, variables, images, channel_sites=frozenset({"nope"}), train=False)


@pytest.mark.slow
def test_error_falls_with_bits_on_a_197_token_vit():
    """Randomly initialized ViT-Ti/16 at 224² (197 tokens): relative feature error falls as the bits rise."""
    model = lampq_jax.create_vit("Ti/16", None, num_layers=4)
    images = np.asarray(jax.random.normal(jax.random.key(0), [8, 224, 224, 3]))
    variables = model.init(jax.random.key(1), images[:1], train=False)
    reference = np.asarray(model.apply(variables, images[4:], train=False))
    errors = {}
    for bits in (3, 4, 6, 8):
        result = lampq_jax.quantize_uniform(model, variables, images[:4], bits, train=False)
        out = np.asarray(result.apply(images[4:], train=False))
        errors[bits] = float(np.linalg.norm(out - reference) / np.linalg.norm(reference))
    assert errors[3] > errors[4] > errors[6] > errors[8], errors
    assert errors[8] < 0.045, errors  # measured 0.035; the goal of 0.02 is not met yet


def test_query_key_equalization_is_exact_and_balances_channel_ranges(tiny_vit):
    from lampq_jax.apply.equalize import attention_statistics, fold_query_key_ratios
    from lampq_jax.apply.sites import find_attention_paths

    model, variables, images = tiny_vit
    attention = find_attention_paths(model, variables, images[:1], train=False)
    before = attention_statistics(model, variables, images, attention, "query_key_ratios", train=False)
    equalized = fold_query_key_ratios(variables, before)
    np.testing.assert_allclose(
        model.apply(equalized, images, train=False), model.apply(variables, images, train=False), rtol=1e-4, atol=1e-5
    )
    ratios = attention_statistics(model, equalized, images, attention, "query_key_ratios", train=False)
    for path in attention:  # after the fold, max|q_d| = max|k_d| for every channel: the ratios are 1
        np.testing.assert_allclose(ratios[path], 1.0, rtol=1e-3)
    assert not np.allclose(before[attention[0]], 1.0)
    with pytest.raises(ValueError, match="statistic must be one of.*'key_max'"):
        attention_statistics(model, variables, images, attention, "key_max", train=False)


def test_silent_channels_get_the_median_range():
    """A channel that never rises above 0 in calibration keeps room for positive values elsewhere."""
    import flax.linen as nn
    from lampq_jax.apply.calibration import SILENT_CHANNEL

    class Linear(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(3)(x)

    rng = np.random.default_rng(0)
    x = rng.uniform(-1.0, 1.0, [64, 4]).astype(np.float32)
    x[:, 0] = -np.abs(x[:, 0])  # channel 0: silent above zero (max 0 < SILENT_CHANNEL × median max)
    model = Linear()
    variables = model.init(jax.random.key(0), x[:1])
    table = calibrate_activations(model, variables, x, method="minmax", channel_sites=frozenset({"Dense_0"}))["Dense_0"]
    scale, zero = table[4, 0], table[4, 1]
    hi = (15 - zero) * scale
    assert SILENT_CHANNEL > 0 and hi[0] >= np.median(x.max(0)) - scale[0]  # widened to the median channel's max
    np.testing.assert_allclose(hi[1:], x[:, 1:].max(0), atol=float(scale.max()))  # the others keep their own


def test_minmax_sites_also_hold_for_per_channel_sites():
    """A per-channel site in `minmax_sites` keeps each channel's full range where 'mse' would clip it."""
    import flax.linen as nn

    class Linear(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(3)(x)

    x = np.random.default_rng(1).standard_t(2, [512, 4]).astype(np.float32)  # heavy tails: MSE clips them
    model = Linear()
    variables = model.init(jax.random.key(0), x[:1])
    sites = frozenset({"Dense_0"})
    kept = calibrate_activations(model, variables, x, method="mse", channel_sites=sites, minmax_sites=sites)
    clipped = calibrate_activations(model, variables, x, method="mse", channel_sites=sites)
    scale, zero = kept["Dense_0"][4]
    np.testing.assert_allclose((15 - zero) * scale, x.max(0), atol=float(scale.max()))
    np.testing.assert_allclose(-zero * scale, x.min(0), atol=float(scale.max()))
    assert (clipped["Dense_0"][4, 0] < 0.9 * scale).any()  # the MSE search shrank some channel's range


def test_minmax_types_keep_the_embedding_input_range(tiny_vit):
    """minmax_types=('embed',) (the default) calibrates the image (the patch embedding's input) min-max; () clips."""
    model, variables, images = tiny_vit
    kept = lampq_jax.quantize_uniform(model, variables, images, 8, train=False, weight_method="rtn")
    clipped = lampq_jax.quantize_uniform(model, variables, images, 8, train=False, weight_method="rtn", minmax_types=())
    (site,) = [l.path for l in kept.quantized.layers if l.type == "embed"]
    scale, zero_point = np.asarray(kept.quantized.act_params[site][8])
    np.testing.assert_allclose(scale, (images.max() - images.min()) / 255, rtol=1e-5)
    np.testing.assert_allclose(zero_point, np.round(-images.min() / scale), atol=1)
    assert np.asarray(clipped.quantized.act_params[site][8])[0] < 0.99 * scale  # MSE clips the Gaussian tails
    assert kept.report["base_quantizers"]["minmax_types"] == ["embed"]
    assert clipped.report["base_quantizers"]["minmax_types"] == []
    with pytest.raises(ValueError, match="minmax_types"):
        lampq_jax.quantize_uniform(model, variables, images, 8, train=False, minmax_types=("patch",))
