import dataclasses

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lampq_jax
from lampq_jax import LampQConfig, ZeroShotConfig, synthesize_calibration
from lampq_jax.data.zero_shot import (
    attention_outputs,
    balanced_labels,
    patch_similarity_entropy,
    random_view,
    synthesis_loss,
    total_variation,
)
from lampq_jax.report import image_grid, report_markdown

SHORT = dict(steps=3, progress=False)


# ----------------------------------------------------------------------------- the loss's pieces


def test_entropy_higher_for_diverse_tokens_than_for_identical_ones():
    key = jax.random.key(0)
    diverse = jax.random.normal(key, (2, 17, 32))
    identical = jnp.broadcast_to(diverse[:, :1], diverse.shape)
    h_diverse, h_same = patch_similarity_entropy(diverse), patch_similarity_entropy(identical)
    chex.assert_shape(h_diverse, (2,))
    assert np.all(np.asarray(h_diverse) > np.asarray(h_same) + 1.0)
    assert np.all(np.asarray(h_diverse) <= np.log(2.0) + 1e-3)  # a density on [−1, 1]: H ≤ log 2


def test_entropy_matches_a_numpy_kde():
    tokens = np.random.default_rng(0).normal(size=(1, 6, 4)).astype(np.float32)
    t = tokens[0] / np.linalg.norm(tokens[0], axis=-1, keepdims=True)
    i, j = np.triu_indices(6, 1)
    s = np.sum(t[i] * t[j], -1)
    h = max(1.06 * s.std() * len(s) ** -0.2, 1e-3)
    u = np.linspace(-1, 1, 64)
    f = np.exp(-0.5 * ((u[:, None] - s[None]) / h) ** 2).mean(-1) / (h * np.sqrt(2 * np.pi))
    expected = -np.sum(f * np.log(f + 1e-12)) * (2 / 63)
    np.testing.assert_allclose(patch_similarity_entropy(jnp.asarray(tokens))[0], expected, rtol=1e-4)


def test_entropy_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"\(2, 1, 8\)"):
        patch_similarity_entropy(jnp.zeros((2, 1, 8)))


def test_total_variation_zero_for_constant_images_and_exact_otherwise():
    assert float(total_variation(jnp.full((2, 5, 5, 3), 0.7))) == 0.0
    x = jnp.zeros((1, 2, 2, 1)).at[0, 0, 0, 0].set(1.0)
    # vertical differences: (0−1)² and 0 → mean 0.5; horizontal: the same → TV = 1
    assert float(total_variation(x)) == pytest.approx(1.0)


def test_random_view_is_a_shift_and_flip_of_the_images():
    x = jax.random.normal(jax.random.key(0), (4, 8, 8, 1))
    view = np.asarray(random_view(x, jax.random.key(5), jitter=2, flip=True))
    x = np.asarray(x)
    candidates = [np.roll(x, (a, b), axis=(1, 2)) for a in range(-2, 3) for b in range(-2, 3)]
    for n in range(4):
        assert any(np.array_equal(view[n], c[n]) or np.array_equal(view[n], c[n, :, ::-1]) for c in candidates)
    np.testing.assert_array_equal(random_view(jnp.asarray(x), jax.random.key(5), jitter=0, flip=False), x)


def test_balanced_labels_cover_every_class():
    labels = np.asarray(balanced_labels(jax.random.key(0), 25, 10))
    assert sorted(np.bincount(labels, minlength=10)) == [2] * 5 + [3] * 5


def test_attention_outputs_one_per_block(tiny_setup):
    model, variables, images = tiny_setup
    out, blocks = attention_outputs(model, variables, images[:3])
    chex.assert_shape(out, (3, 10))
    assert [b.shape for b in blocks] == [(3, 17, 32)] * 2


def test_loss_parts_and_the_ce_term_only_with_labels(tiny_setup):
    model, variables, images = tiny_setup
    weights = dict(entropy_weight=1.0, ce_weight=1.0, tv_weight=0.5, kde_points=32)
    labels = jnp.arange(4) % 10
    loss, parts = synthesis_loss(model, variables, images[:4], labels, **weights)
    logits = model.apply(variables, images[:4])
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    np.testing.assert_allclose(parts["ce"], ce, rtol=1e-5)
    np.testing.assert_allclose(parts["tv"], total_variation(images[:4]), rtol=1e-6)
    np.testing.assert_allclose(loss, -parts["entropy"] + parts["ce"] + 0.5 * parts["tv"], rtol=1e-5)
    loss_features, parts_features = synthesis_loss(model, variables, images[:4], None, **weights)
    assert float(parts_features["ce"]) == 0.0
    np.testing.assert_allclose(loss_features, -parts["entropy"] + 0.5 * parts["tv"], rtol=1e-5)


# ----------------------------------------------------------------------------- synthesis


def test_synthesis_lowers_the_loss_and_is_deterministic(tiny_setup):
    model, variables, _ = tiny_setup
    history = []
    kwargs = dict(steps=25, rng=jax.random.key(3), progress=False, pixel_range=(-2.0, 2.0), lr=0.05)
    images = synthesize_calibration(model, variables, 6, (28, 28, 1), callback=lambda k, p: history.append(p), **kwargs)
    chex.assert_shape(images, (6, 28, 28, 1))
    assert images.dtype == np.float32 and images.min() >= -2.0 and images.max() <= 2.0
    assert len(history) == 25
    assert np.mean([p["loss"] for p in history[-5:]]) < history[0]["loss"] - 0.1
    np.testing.assert_array_equal(images, synthesize_calibration(model, variables, 6, (28, 28, 1), **kwargs))
    other = synthesize_calibration(model, variables, 6, (28, 28, 1), **{**kwargs, "rng": jax.random.key(4)})
    assert not np.allclose(images, other)


def test_groups_and_custom_optimizer(tiny_setup):
    model, variables, _ = tiny_setup
    images = synthesize_calibration(
        model, variables, 5, (28, 28, 1), rng=jax.random.key(0), group_size=2, optimizer=optax.sgd(0.0), **SHORT
    )
    start = np.asarray(jax.random.normal(jax.random.split(jax.random.key(0), 3)[0], (5, 28, 28, 1)))
    np.testing.assert_array_equal(images, start)  # a zero learning rate leaves the N(0, 1) start as it is


@pytest.mark.parametrize("steps", [0, -3, 2.5])
def test_bad_steps_named(tiny_setup, steps):
    model, variables, _ = tiny_setup
    with pytest.raises(ValueError, match=f"steps must be a positive integer, got {steps}"):
        synthesize_calibration(model, variables, 2, (28, 28, 1), steps=steps, rng=jax.random.key(0))


def test_bad_num_images_named(tiny_setup):
    model, variables, _ = tiny_setup
    with pytest.raises(ValueError, match="num_images must be a positive integer, got 0"):
        synthesize_calibration(model, variables, 0, (28, 28, 1), steps=2, rng=jax.random.key(0))


@pytest.mark.parametrize("shape", [(56, 56, 1), (28, 28, 3)])
def test_shape_that_does_not_fit_the_model_named(tiny_setup, shape):
    model, variables, _ = tiny_setup
    with pytest.raises(ValueError, match=rf"image_shape \({shape[0]}, {shape[1]}, {shape[2]}\) does not fit"):
        synthesize_calibration(model, variables, 2, shape, rng=jax.random.key(0), **SHORT)


def test_shape_that_is_not_an_image_named(tiny_setup):
    model, variables, _ = tiny_setup
    with pytest.raises(ValueError, match=r"\(height, width, channels\), got \(784,\)"):
        synthesize_calibration(model, variables, 2, (784,), rng=jax.random.key(0), **SHORT)


def test_nan_during_synthesis_names_the_step(tiny_setup):
    model, variables, _ = tiny_setup
    blow_up = optax.chain(optax.sgd(1.0), optax.stateless(lambda u, p: jax.tree.map(lambda g: g * jnp.inf, u)))
    with pytest.raises(ValueError, match="diverged at step 1 of 3"):
        synthesize_calibration(model, variables, 2, (28, 28, 1), rng=jax.random.key(0), optimizer=blow_up, **SHORT)


def test_model_without_attention_rejected():
    class Mlp(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(10)(x.reshape(x.shape[0], -1))

    model = Mlp()
    variables = model.init(jax.random.key(0), jnp.zeros((1, 4, 4, 1)))
    with pytest.raises(ValueError, match="no nn.MultiHeadDotProductAttention"):
        synthesize_calibration(model, variables, 2, (4, 4, 1), rng=jax.random.key(0), **SHORT)


def test_image_grid_layout():
    images = np.arange(3 * 2 * 2 * 1, dtype=np.float32).reshape(3, 2, 2, 1)
    grid = image_grid(images, columns=2)
    chex.assert_shape(grid, (4, 4, 1))
    np.testing.assert_allclose(grid[:2, :2, 0], [[0, 1 / 3], [2 / 3, 1]])
    np.testing.assert_array_equal(grid[2:, 2:], 1.0)  # the empty cell is white
    with pytest.raises(ValueError, match=r"\(3, 2, 2\)"):
        image_grid(images[..., 0])


# ----------------------------------------------------------------------------- in the pipeline


def test_zero_shot_quantize_end_to_end(tiny_setup):
    model, variables, images = tiny_setup
    zero_shot = ZeroShotConfig(image_shape=(28, 28, 1), num_images=8, steps=10, progress=False)
    config = LampQConfig(progress=False, iterations=1, probes=2)
    result = lampq_jax.quantize(model, variables, budget=4.0, config=config, zero_shot=zero_shot)
    chex.assert_shape(result.synthetic_images, (8, 28, 28, 1))
    expected = synthesize_calibration(model, variables, 8, (28, 28, 1), steps=10, rng=jax.random.key(0), progress=False)
    np.testing.assert_array_equal(result.synthetic_images, expected)
    settings = result.report["zero_shot"]
    assert settings["num_images"] == 8 and settings["output"] == "logits" and settings["seconds"] > 0
    assert "zero_shot" in result.timings and result.report["avg_weight_bits_allocated"] <= 4.0 + 1e-9
    assert "## Zero-shot calibration" in report_markdown(result)
    out = np.asarray(result.apply(images))
    assert np.isfinite(out).all() and out.shape == (16, 10)
    uniform = lampq_jax.quantize_uniform(model, variables, None, 4, zero_shot=zero_shot)
    np.testing.assert_array_equal(uniform.synthetic_images, expected)


def test_zero_shot_and_images_exclusive(tiny_setup):
    model, variables, images = tiny_setup
    zero_shot = ZeroShotConfig(image_shape=(28, 28, 1), num_images=2, steps=1, progress=False)
    with pytest.raises(ValueError, match="not both"):
        lampq_jax.quantize(model, variables, images, budget=4.0, zero_shot=zero_shot)
    with pytest.raises(ValueError, match="or zero_shot=ZeroShotConfig"):
        lampq_jax.quantize(model, variables, budget=4.0)
    with pytest.raises(ValueError, match="labels were given with zero_shot"):
        lampq_jax.quantize(model, variables, budget=4.0, labels=np.zeros(2, int), zero_shot=zero_shot)
    with pytest.raises(ValueError, match="image_shape is required"):
        lampq_jax.quantize_uniform(
            model, variables, None, 4, zero_shot=dataclasses.replace(zero_shot, image_shape=None)
        )
