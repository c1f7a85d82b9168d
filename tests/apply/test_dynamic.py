import chex
import numpy as np
import pytest

import lampq_jax
from lampq_jax.apply.dynamic import DynamicQuantizer, dynamic_forward
from lampq_jax.apply.fake import quant_point, quantize_weights
from lampq_jax.apply.model import QuantizedModel


def test_dynamic_bits_equal_the_static_model_and_compile_once(tiny_setup):
    model, variables, images = tiny_setup
    forward = dynamic_forward(model, ())
    before = forward._cache_size()
    for bits in (3, 4, 8):
        result = lampq_jax.quantize_uniform(model, variables, images, bits, weight_method="rtn", center_keys=False)
        q = result.quantized
        dq = DynamicQuantizer(model, variables, q.layers, [p for p, _ in q.spec.attention], q.act_params)
        np.testing.assert_array_equal(dq.apply(images, result.bits, result.attention_bits), result.apply(images))
    assert forward._cache_size() - before == 1
    # nothing quantized: the full-precision model
    np.testing.assert_allclose(dq.apply(images, {}, {}), model.apply(variables, images), rtol=1e-5, atol=1e-5)


def test_point_from_the_cache_equals_quant_point(tiny_setup):
    model, variables, images = tiny_setup
    result = lampq_jax.quantize_uniform(model, variables, images, 4, center_keys=False)
    q = result.quantized
    dq = DynamicQuantizer(model, variables, q.layers, [p for p, _ in q.spec.attention], q.act_params)
    dq.apply(images, result.bits, result.attention_bits)  # fills the cache
    point = dq.point(result.bits, result.attention_bits)
    expected = quant_point(variables, q.layers, q.spec, q.act_params)
    assert point.spec == expected.spec and point.act_params is q.act_params
    chex.assert_trees_all_equal(point.variables, expected.variables)
    with pytest.raises(ValueError, match="unknown layer path"):
        dq.point({"no/such/layer": (4, 4)})


def test_cached_weights_are_the_final_models_weights(tiny_setup):
    model, variables, images = tiny_setup
    result = lampq_jax.quantize_uniform(model, variables, images, 3, weight_method="rtn", center_keys=False)
    q = result.quantized
    dq = DynamicQuantizer(model, variables, q.layers, [p for p, _ in q.spec.attention], q.act_params)
    weights = dq.weights({p: wb for p, (wb, _) in result.bits.items()})
    chex.assert_trees_all_equal(weights, quantize_weights(variables, q.layers, q.spec))
    rebuilt = QuantizedModel.create(model, variables, q.layers, q.spec, q.act_params, {}, weights=weights)
    chex.assert_trees_all_equal(rebuilt.variables, q.variables)
    one = next(iter(weights))
    with pytest.raises(ValueError, match="do not match the spec's layers"):
        QuantizedModel.create(model, variables, q.layers, q.spec, q.act_params, {}, weights={one: weights[one]})
