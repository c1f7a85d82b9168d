import numpy as np
import pytest

from lampq_jax.sensitivity.metric import alpha_by_type, alpha_by_unit


def test_alpha_by_unit_matches_each_measurement_and_floors_noise():
    types = ["qkv", "qkv", "fc2", "fc2"]
    predicted = np.array([2.0, 4.0, 1.0, 1.0])
    measured = {0: 1.0, 1: 1.0, 2: 3.0, 3: -0.5}  # unit 3: noise below zero
    alpha = alpha_by_unit(types, predicted, measured)
    np.testing.assert_allclose(alpha[:3], [0.5, 0.25, 3.0])
    type_alpha = alpha_by_type("probe", types, predicted, measured_low=measured)["fc2"]  # (3 + 0) / 2
    assert type_alpha == pytest.approx(1.5)
    assert alpha[3] == pytest.approx(0.1 * type_alpha)  # the floor: a tenth of its type's figure


def test_alpha_by_unit_needs_every_unit():
    with pytest.raises(ValueError, match=r"\[1\]"):
        alpha_by_unit(["qkv", "fc2"], np.ones(2), {0: 1.0})


def test_type_modes_reject_layer():
    with pytest.raises(ValueError, match="'layer'"):
        alpha_by_type("layer", ["qkv"], np.ones(1))
