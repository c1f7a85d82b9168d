import gc
import weakref

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lampq_jax.apply import compiled
from lampq_jax.apply.calibration import collect_site_samples
from lampq_jax.apply.dynamic import DynamicBits, dynamic_apply
from conftest import tiny_vit


def _scaled_sum(x, *, model, kwargs, scale):
    return jnp.sum(x) * scale


def test_one_jitted_pass_per_key_and_reused():
    model = tiny_vit()
    first = compiled.compiled(_scaled_sum, model, (), scale=2.0)
    assert compiled.compiled(_scaled_sum, model, (), scale=2.0) is first
    assert compiled.compiled(_scaled_sum, model, (), scale=3.0) is not first
    x = jnp.ones((3,))
    assert float(first(x)) == 6.0 and float(first(x + 1)) == 12.0
    assert first._cache_size() == 1  # the second call reused the compiled code


def test_the_table_keeps_the_most_recently_used(monkeypatch):
    monkeypatch.setattr(compiled, "CAPACITY", 2)
    compiled.clear()
    model = tiny_vit()
    a = compiled.compiled(_scaled_sum, model, (), scale=1.0)
    compiled.compiled(_scaled_sum, model, (), scale=2.0)
    assert compiled.compiled(_scaled_sum, model, (), scale=1.0) is a  # used again: now the newest
    compiled.compiled(_scaled_sum, model, (), scale=3.0)  # drops scale=2.0, the least recently used
    assert compiled.size() == 2
    assert compiled.compiled(_scaled_sum, model, (), scale=1.0) is a


def test_clear_releases_the_model_of_a_real_pass():
    """A calibration pass and a dynamic forward hold their model only through the table."""
    model = tiny_vit(num_layers=1)
    images = np.asarray(jax.random.normal(jax.random.key(0), (4, 28, 28, 1)))
    variables = model.init(jax.random.key(1), images[:1])
    collect_site_samples(model, variables, images, batch_size=2, train=False)
    dynamic_apply(variables, DynamicBits({}, {}, {}), images, model=model, kwargs=(("train", False),))
    alive = weakref.ref(model)
    del model
    gc.collect()
    assert alive() is not None  # kept by the table, so the next call does not compile again
    compiled.clear()
    gc.collect()
    assert alive() is None
    assert compiled.size() == 0


def test_unhashable_options_are_named():
    with pytest.raises(TypeError, match="_scaled_sum needs a hashable"):
        compiled.compiled(_scaled_sum, tiny_vit(), (), scale=[1.0])
