import numpy as np
import pytest

from lampq_jax.data.photos import CALIBRATION_SOURCES, EVALUATION_SOURCES, photo_crops


def test_calibration_and_evaluation_photos_are_disjoint_and_crops_deterministic():
    assert not set(CALIBRATION_SOURCES) & set(EVALUATION_SOURCES)
    a = photo_crops("evaluation", 3, 32, seed=1)
    assert a.shape == (3, 32, 32, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, photo_crops("evaluation", 3, 32, seed=1))
    assert not np.array_equal(a, photo_crops("evaluation", 3, 32, seed=2))
    with pytest.raises(ValueError, match="split must be one of"):
        photo_crops("train", 1, 32)
    with pytest.raises(ValueError, match="num and size"):
        photo_crops("calibration", 0, 32)
