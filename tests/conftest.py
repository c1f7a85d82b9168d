import functools
import os

import jax
import pytest

from lampq_jax import create_vit

# A user's $LAMPQ_COMPILE_CACHE would switch jax's persistent compilation cache on for the whole session.
os.environ["LAMPQ_COMPILE_CACHE"] = "off"


def tiny_vit(num_layers: int = 2, **overrides):
    """A 28×28×1 ViT small enough for CPU tests (patch 7 → 16 tokens + cls)."""
    kwargs = dict(num_layers=num_layers, hidden_size=32, mlp_dim=64, num_heads=2, patch_size=7)
    kwargs.update(overrides)
    return create_vit("Ti/7", 10, **kwargs)


def randomize_head(variables, seed: int = 3, scale: float = 0.3):
    """Scenic zero-initialises output_projection; give it random weights so logits are informative."""

    def fill(path, leaf):
        if "output_projection" in jax.tree_util.keystr(path) and "kernel" in jax.tree_util.keystr(path):
            return scale * jax.random.normal(jax.random.key(seed), leaf.shape, leaf.dtype)
        return leaf

    return jax.tree_util.tree_map_with_path(fill, variables)


@functools.lru_cache(maxsize=1)
def tiny_setup_values():
    """(model, variables, images [16, 28, 28, 1]) of `tiny_vit`, built once per process."""
    model = tiny_vit()
    images = jax.random.normal(jax.random.key(1), (16, 28, 28, 1))
    variables = randomize_head(model.init(jax.random.key(0), images[:1]))
    return model, variables, images


@pytest.fixture(scope="session")
def tiny_setup():
    return tiny_setup_values()
