"""The library's embedded default model: a small Scenic-layout ViT trained on Fashion-MNIST.

Shipped in `lampq_jax/assets/` (written by `scripts/train_fmnist.py`), so the demo and the
benchmarks need neither a network nor the Debian dataset package:

    fmnist_vit.json      create_vit arguments, normalisation, measured test accuracy, class names
    fmnist_vit.msgpack   flax.serialization bytes of {"params": ...}
    fmnist_subset.npz    uint8 images: calib (256) and val (2,000) from held-out training
                         images, test (2,000) from the test set

Example:
    >>> model, variables, config = load_embedded_model()
    >>> subset = load_embedded_subset()
    >>> logits = model.apply(variables, subset["test_images"], train=False)   # [2000, 10]
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

from lampq_jax.models import create_vit

ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets"
CONFIG_FILE = "fmnist_vit.json"
PARAMS_FILE = "fmnist_vit.msgpack"
SUBSET_FILE = "fmnist_subset.npz"


def _asset(name: str) -> Path:
    path = ASSETS_DIR / name
    if not path.is_file():
        raise FileNotFoundError(
            f"embedded asset not found: {path}; regenerate it with `python scripts/train_fmnist.py`"
        )
    return path


def load_embedded_config() -> dict[str, Any]:
    """Returns the embedded model's config (the contents of `fmnist_vit.json`)."""
    return json.loads(_asset(CONFIG_FILE).read_text())


def load_embedded_model() -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """Loads the embedded Fashion-MNIST ViT.

    Returns:
      `(model, variables, config)`: a `ViT` (flax.linen module), its variables `{"params": ...}`
      as jax arrays, and the config dict (variant, overrides, normalization, test_accuracy, ...).
      The model takes normalised images `[batch, 28, 28, 1]` float32 and returns `[batch, 10]`.
    """
    config = load_embedded_config()
    overrides = dict(config["overrides"])
    if "patch_size" in overrides:
        overrides["patch_size"] = tuple(overrides["patch_size"])
    model = create_vit(config["variant"], config["num_classes"], **overrides)
    target = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros([1, *config["image_shape"]], jnp.float32), train=False)
    )
    target = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), target)
    variables = flax.serialization.from_bytes(target, _asset(PARAMS_FILE).read_bytes())
    variables = jax.tree_util.tree_map(jnp.asarray, variables)
    return model, variables, config


def normalize_embedded(images: np.ndarray) -> np.ndarray:
    """uint8 Fashion-MNIST images [N, 28, 28, 1] as the embedded model's float32 inputs: (x / 255 − mean) / std."""
    norm = load_embedded_config()["normalization"]
    mean, std = np.float32(norm["mean"]), np.float32(norm["std"])
    return (np.asarray(images).astype(np.float32) / np.float32(255.0) - mean) / std


def load_embedded_subset() -> dict[str, np.ndarray]:
    """Loads the embedded calibration / validation / test images, normalised.

    Returns:
      A dict with `calib_images` [256, 28, 28, 1], `val_images` [2000, 28, 28, 1] and
      `test_images` [2000, 28, 28, 1] as float32 normalised by `(x / 255 - mean) / std`
      (the constants stored in the config), and `calib_labels`, `val_labels`, `test_labels`
      as int32. Calibration and validation images come from the 5,000 training images held
      out from training; test images from the Fashion-MNIST test set.
    """
    out: dict[str, np.ndarray] = {}
    with np.load(_asset(SUBSET_FILE)) as data:
        for key in data.files:
            if key.endswith("_images"):
                out[key] = normalize_embedded(data[key])
            elif key.endswith("_labels"):
                out[key] = data[key].astype(np.int32)
    return out
