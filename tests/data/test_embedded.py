"""The embedded Fashion-MNIST ViT, its subset, and the IDX reader."""

import gzip

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lampq_jax.data.embedded import load_embedded_model, load_embedded_subset
from lampq_jax.data.fashion_mnist import MEAN, STD, load_fashion_mnist, normalize, read_idx

# The committed checkpoint scores 0.8865 on the 2,000 embedded test images (0.8853 on all 10,000);
# pinned 1 % below.
MIN_SUBSET_ACCURACY = 0.876


@pytest.fixture(scope="module")
def embedded():
    return load_embedded_model(), load_embedded_subset()


def test_subset_shapes_and_dtypes(embedded):
    _, subset = embedded
    for name, n in [("calib", 256), ("val", 2000), ("test", 2000)]:
        assert subset[f"{name}_images"].shape == (n, 28, 28, 1)
        assert subset[f"{name}_images"].dtype == np.float32
        assert subset[f"{name}_labels"].shape == (n,)
        assert subset[f"{name}_labels"].dtype == np.int32
        assert set(np.unique(subset[f"{name}_labels"])) <= set(range(10))
    # Normalised: roughly zero mean, unit variance.
    assert abs(float(subset["test_images"].mean())) < 0.1
    assert abs(float(subset["test_images"].std()) - 1.0) < 0.1


def test_config(embedded):
    (model, variables, config), _ = embedded
    assert config["num_classes"] == 10
    assert config["image_shape"] == [28, 28, 1]
    assert config["normalization"] == {"mean": MEAN, "std": STD}
    assert len(config["class_names"]) == 10
    assert config["overrides"]["num_layers"] >= 6
    assert config["test_accuracy"] >= 0.88
    blocks = [k for k in variables["params"]["Transformer"] if k.startswith("encoderblock_")]
    assert len(blocks) == config["overrides"]["num_layers"]


@pytest.mark.slow
def test_embedded_model_accuracy(embedded):
    (model, variables, _), subset = embedded
    predict = jax.jit(lambda v, x: jnp.argmax(model.apply(v, x, train=False), -1))
    preds = np.concatenate(
        [np.asarray(predict(variables, subset["test_images"][i : i + 500])) for i in range(0, 2000, 500)]
    )
    accuracy = float(np.mean(preds == subset["test_labels"]))
    assert accuracy >= MIN_SUBSET_ACCURACY, accuracy


@pytest.mark.parametrize("compress", [False, True])
def test_read_idx_parses_tiny_file(tmp_path, compress):
    data = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    raw = bytes([0, 0, 0x08, 3]) + np.array(data.shape, dtype=">u4").tobytes() + data.tobytes()
    path = tmp_path / ("tiny.idx.gz" if compress else "tiny.idx")
    path.write_bytes(gzip.compress(raw) if compress else raw)
    out = read_idx(path)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, data)


def test_read_idx_rejects_bad_size(tmp_path):
    raw = bytes([0, 0, 0x08, 1]) + np.array([5], dtype=">u4").tobytes() + b"\x01\x02"
    path = tmp_path / "short.idx"
    path.write_bytes(raw)
    with pytest.raises(ValueError, match="short.idx"):
        read_idx(path)


def test_missing_files_name_the_path(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere") as info:
        load_fashion_mnist("test", root=missing)
    assert "t10k-images-idx3-ubyte.gz" in str(info.value)
    assert "apt-get install -y dataset-fashion-mnist" in str(info.value)
    with pytest.raises(FileNotFoundError, match="absent.idx"):
        read_idx(tmp_path / "absent.idx")


def test_bad_split():
    with pytest.raises(ValueError, match="valid"):
        load_fashion_mnist("valid")


def test_normalize():
    x = np.array([0, 255], dtype=np.uint8)
    np.testing.assert_allclose(normalize(x), [(0 - MEAN) / STD, (1 - MEAN) / STD], rtol=1e-6)
    assert normalize(x).dtype == np.float32
