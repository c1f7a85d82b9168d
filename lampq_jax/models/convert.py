"""Converters from other ViT checkpoint layouts into the Scenic layout of `lampq_jax.models.vit`.

Every converter returns `(variables, config)`:

* `variables = {"params": tree}`: a nested dict of numpy arrays in Scenic's names
  (`embedding`, `cls`, `Transformer/posembed_input/pos_embedding`,
  `Transformer/encoderblock_i/...`, `Transformer/encoder_norm`, `pre_logits`,
  `output_projection`), ready for `ViT.apply`.
* `config`: the `ViT` keyword arguments that reproduce the source model, so that
  `build_model(config).apply(variables, images)` (images `[batch, H, W, C]`, NHWC) gives the
  source model's logits, or its pooled features when the source has no classifier head.

Sources:

| converter | source | LayerNorm eps | GELU |
|---|---|---|---|
| `from_timm` | timm `VisionTransformer` (ViT, DeiT, DeiT-III) state dicts | 1e-6 | exact |
| `from_huggingface` | HF `ViT[Model,ForImageClassification]`, `DeiT[...]`, `Dinov2Model` | config | config |
| `from_augreg_npz` | google-research/vision_transformer `.npz` (AugReg and the original ViT) | 1e-6 | tanh |
| `from_big_vision` | big_vision `models/vit.py` trees, also `scan=True` | 1e-6 | tanh |

Each converter first checks the keys it receives against those the inferred architecture needs
and raises `ValueError` naming the missing and the unexpected ones. The position embedding is
resized to another input resolution with `image_size=` (see `resize_pos_embedding`).

Example:
    >>> import timm
    >>> reference = timm.create_model("vit_tiny_patch16_224", pretrained=False).eval()
    >>> variables, config = from_timm(reference.state_dict(), num_heads=3)
    >>> logits = build_model(config).apply(variables, images_nhwc)  # == reference(images_nchw)
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable, Mapping
from typing import Any, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from lampq_jax.models.vit import ViT

Config = dict[str, Any]
Variables = dict[str, Any]
ImageSize = Union[int, Sequence[int]]

__all__ = [
    "build_model",
    "from_augreg_npz",
    "from_big_vision",
    "from_huggingface",
    "from_timm",
    "resize_pos_embedding",
    "torch_bicubic_matrix",
    "unstack_scanned",
]

# Any non-None value turns LayerScale on; the converted `scale` parameters replace it.
_LAYER_SCALE_PLACEHOLDER = 1e-5


# ----------------------------------------------------------------------------------------------
# Small tree and array utilities.


def _to_numpy(value: Any) -> np.ndarray:
    """Numpy copy of a numpy / jax array or a torch tensor (bfloat16 tensors become float32)."""
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # torch.Tensor, without importing torch
        tensor = value.detach().cpu()
        if str(tensor.dtype) == "torch.bfloat16":
            tensor = tensor.float()
        return np.asarray(tensor.numpy())
    return np.asarray(value)


def _flatten(tree: Any, sep: str = "/") -> dict[str, Any]:
    """Flattens a nested mapping into `{"a/b/c": leaf}`; a flat mapping passes through."""
    flat: dict[str, Any] = {}

    def visit(prefix: str, node: Any) -> None:
        if isinstance(node, Mapping) or (hasattr(node, "keys") and hasattr(node, "__getitem__")):
            for key in node.keys():
                visit(f"{prefix}{sep}{key}" if prefix else str(key), node[key])
        else:
            flat[prefix] = node

    visit("", tree)
    return flat


def _unflatten(flat: Mapping[str, Any], sep: str = "/") -> dict[str, Any]:
    """Inverse of `_flatten`: `{"a/b": x}` → `{"a": {"b": x}}`."""
    tree: dict[str, Any] = {}
    for key, value in flat.items():
        node = tree
        *parents, leaf = key.split(sep)
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def _format_keys(keys: Iterable[str], limit: int = 12) -> str:
    keys = sorted(keys)
    shown = ", ".join(repr(k) for k in keys[:limit])
    if len(keys) > limit:
        shown += f", ... ({len(keys) - limit} more)"
    return f"[{shown}]"


def _check_keys(source: str, given: Iterable[str], expected: Iterable[str], hint: str = "") -> None:
    """Raises `ValueError` listing the keys that are missing from / unexpected in `given`."""
    given, expected = set(given), set(expected)
    missing, unexpected = expected - given, given - expected
    if not missing and not unexpected:
        return
    parts = [f"{source}: the checkpoint does not match the architecture inferred from it."]
    if missing:
        parts.append(f"Missing keys ({len(missing)}): {_format_keys(missing)}.")
    if unexpected:
        parts.append(f"Unexpected keys ({len(unexpected)}): {_format_keys(unexpected)}.")
    if hint:
        parts.append(hint)
    raise ValueError(" ".join(parts))


def _required(source: str, flat: Mapping[str, Any], keys: Iterable[str], hint: str = "") -> None:
    """Raises the `_check_keys` error when any of `keys` is absent (before shapes are read)."""
    missing = [k for k in keys if k not in flat]
    if missing:
        _check_keys(source, flat, set(flat) | set(missing), hint)


def _block_count(source: str, keys: Iterable[str], pattern: str) -> int:
    """Number of blocks: one more than the largest index matched by `pattern` (group 1)."""
    regex = re.compile(pattern)
    indices = {int(m.group(1)) for m in map(regex.match, keys) if m}
    if not indices:
        raise ValueError(f"{source}: found no transformer blocks (no key matches {pattern!r}).")
    return max(indices) + 1


def _drop_ignored(flat: dict[str, Any], ignore: Iterable[str]) -> dict[str, Any]:
    prefixes = tuple(ignore)
    if not prefixes:
        return flat
    return {k: v for k, v in flat.items() if not k.startswith(prefixes)}


def _image_hw(image_size: ImageSize) -> tuple[int, int]:
    if isinstance(image_size, (int, np.integer)):
        return int(image_size), int(image_size)
    hw = tuple(int(s) for s in image_size)
    if len(hw) != 2:
        raise ValueError(f"image_size must be an int or (height, width), got {image_size!r}")
    return hw  # type: ignore[return-value]


def _square_grid(num_tokens: int) -> Optional[tuple[int, int]]:
    side = math.isqrt(num_tokens)
    return (side, side) if side * side == num_tokens and side > 0 else None


def _maybe_resize(
    source: str,
    posemb: np.ndarray,
    num_prefix_tokens: int,
    patch_size: tuple[int, int],
    image_size: Optional[ImageSize],
) -> np.ndarray:
    """Resizes the grid part of `posemb: [1, T, D]` to `image_size // patch_size` when asked."""
    if image_size is None:
        return posemb
    h, w = _image_hw(image_size)
    ph, pw = patch_size
    if h % ph or w % pw:
        raise ValueError(f"{source}: image_size {(h, w)} is not a multiple of the patch size {patch_size}")
    return np.asarray(resize_pos_embedding(posemb, (h // ph, w // pw), num_prefix_tokens))


# Scenic names of the pieces of one block.
_LN0 = "LayerNorm_0"
_LN1 = "LayerNorm_1"
_MHA = "MultiHeadDotProductAttention_0"
_MLP = "MlpBlock_0"


def _put_modules(out: dict[str, Any], prefix: str, parts: Mapping[str, Mapping[str, Any]]) -> None:
    """out['<prefix><module>/<name>'] = value for every module's params."""
    for module, params in parts.items():
        for name, value in params.items():
            out[f"{prefix}{module}/{name}"] = value


def _put_top(
    out: dict[str, Any], flat: Mapping[str, Any], *, norm: str, pre_logits: Optional[str], head: Optional[str]
) -> tuple[Optional[int], Optional[int]]:
    """Adds encoder_norm, pre_logits and output_projection from torch keys '<prefix>.weight/.bias'.

    Returns (representation_size, num_classes), None for a part that is absent.
    """
    _put_modules(out, "Transformer/", {"encoder_norm": _layer_norm(flat[f"{norm}.weight"], flat[f"{norm}.bias"])})
    sizes = []
    for prefix, module in ((pre_logits, "pre_logits"), (head, "output_projection")):
        if prefix is None:
            sizes.append(None)
            continue
        dense = _linear(flat[f"{prefix}.weight"], flat[f"{prefix}.bias"])
        _put_modules(out, "", {module: dense})
        sizes.append(dense["kernel"].shape[1])
    return sizes[0], sizes[1]


def _linear(weight: Any, bias: Optional[Any]) -> dict[str, np.ndarray]:
    """torch `Linear` (weight `[out, in]`) → flax `Dense` (kernel `[in, out]`)."""
    w = _to_numpy(weight)
    b = np.zeros(w.shape[0], w.dtype) if bias is None else _to_numpy(bias)
    return {"kernel": np.ascontiguousarray(w.T), "bias": b}


def _layer_norm(weight: Any, bias: Any) -> dict[str, np.ndarray]:
    return {"scale": _to_numpy(weight), "bias": _to_numpy(bias)}


def _attention(
    q: tuple[Any, Optional[Any]],
    k: tuple[Any, Optional[Any]],
    v: tuple[Any, Optional[Any]],
    out: tuple[Any, Optional[Any]],
    num_heads: int,
) -> dict[str, dict[str, np.ndarray]]:
    """torch Linear pairs `(weight, bias)` → flax `MultiHeadDotProductAttention` params.

    query/key/value kernels `[D, H, D/H]` and biases `[H, D/H]`; out kernel `[H, D/H, D]`.
    The head split follows the feature order of the torch projections (heads outermost).
    """
    params = {}
    for name, (weight, bias) in (("query", q), ("key", k), ("value", v)):
        dense = _linear(weight, bias)
        dim_in, dim_out = dense["kernel"].shape
        head_dim = dim_out // num_heads
        params[name] = {
            "kernel": dense["kernel"].reshape(dim_in, num_heads, head_dim),
            "bias": dense["bias"].reshape(num_heads, head_dim),
        }
    dense = _linear(*out)
    dim_in, dim_out = dense["kernel"].shape
    params["out"] = {"kernel": dense["kernel"].reshape(num_heads, dim_in // num_heads, dim_out), "bias": dense["bias"]}
    return params


def _patch_embedding(weight: Any, bias: Optional[Any]) -> dict[str, np.ndarray]:
    """torch `Conv2d` weight `[D, C, ph, pw]` (OIHW) → flax `Conv` kernel `[ph, pw, C, D]` (HWIO)."""
    w = _to_numpy(weight)
    b = np.zeros(w.shape[0], w.dtype) if bias is None else _to_numpy(bias)
    return {"kernel": np.ascontiguousarray(w.transpose(2, 3, 1, 0)), "bias": b}


def _check_heads(source: str, hidden: int, num_heads: int) -> None:
    if num_heads <= 0 or hidden % num_heads:
        raise ValueError(f"{source}: hidden size {hidden} is not divisible by num_heads={num_heads}")


def _finish(flat_scenic: Mapping[str, Any]) -> Variables:
    return {"params": _unflatten({k: _to_numpy(v) for k, v in flat_scenic.items()})}


# ----------------------------------------------------------------------------------------------
# Position embeddings.


def resize_pos_embedding(
    posemb: jax.typing.ArrayLike,
    new_grid: tuple[int, int],
    num_prefix_tokens: int,
    *,
    old_grid: Optional[tuple[int, int]] = None,
    method: str = "bilinear",
    antialias: bool = True,
) -> jax.Array:
    """Resizes the patch-grid part of a position embedding, keeping the prefix tokens.

    The embedding is `[prefix tokens (cls, dist), grid rows * grid cols]` along the token axis;
    the grid part is reshaped to `[old_h, old_w, D]`, resized with `jax.image.resize` to
    `[new_h, new_w, D]` and flattened back; the prefix rows are kept as they are.
    `method="torch_bicubic"` resizes as torch's `interpolate(mode="bicubic", align_corners=False)`
    does (what DINOv2 / Hugging Face use; see `torch_bicubic_matrix`), without antialiasing.

    Args:
      posemb: `[1, T, D]` with `T = num_prefix_tokens + old_h * old_w`.
      new_grid: `(new_h, new_w)` patches, e.g. `(image_h // patch_h, image_w // patch_w)`.
      num_prefix_tokens: tokens before the grid (1 for `cls`, 2 with `dist`, 0 for "gap").
      old_grid: the grid of `posemb`; inferred as square when None.
      method: `jax.image.resize` method ("bilinear", "bicubic", ...) or "torch_bicubic".
      antialias: passed to `jax.image.resize` (matters only when shrinking).

    Returns:
      `[1, num_prefix_tokens + new_h * new_w, D]`, the input itself when the grid is unchanged.
    """
    posemb = jnp.asarray(posemb)
    if posemb.ndim != 3 or posemb.shape[0] != 1:
        raise ValueError(f"posemb must have shape [1, tokens, dim], got {posemb.shape}")
    if not 0 <= num_prefix_tokens <= posemb.shape[1]:
        raise ValueError(f"num_prefix_tokens={num_prefix_tokens} is out of range for posemb shape {posemb.shape}")
    num_grid = posemb.shape[1] - num_prefix_tokens
    if old_grid is None:
        old_grid = _square_grid(num_grid)
        if old_grid is None:
            raise ValueError(
                f"posemb has {num_grid} grid tokens (shape {posemb.shape}, {num_prefix_tokens} prefix tokens), "
                "which is not a square grid: pass old_grid=(h, w)"
            )
    old_h, old_w = (int(s) for s in old_grid)
    if old_h * old_w != num_grid:
        raise ValueError(f"old_grid {old_grid} has {old_h * old_w} tokens but posemb has {num_grid} grid tokens")
    new_h, new_w = (int(s) for s in new_grid)
    if new_h <= 0 or new_w <= 0:
        raise ValueError(f"new_grid must be positive, got {new_grid}")
    if (new_h, new_w) == (old_h, old_w):
        return posemb
    prefix, grid = posemb[:, :num_prefix_tokens], posemb[0, num_prefix_tokens:]
    dim = posemb.shape[-1]
    grid = grid.reshape(old_h, old_w, dim).astype(jnp.float32)
    if method == "torch_bicubic":
        rows, cols = torch_bicubic_matrix(old_h, new_h), torch_bicubic_matrix(old_w, new_w)
        grid = jnp.einsum("ih,jw,hwd->ijd", rows, cols, grid, precision=jax.lax.Precision.HIGHEST)
    else:
        grid = jax.image.resize(grid, (new_h, new_w, dim), method=method, antialias=antialias)
    grid = grid.reshape(1, new_h * new_w, dim).astype(posemb.dtype)
    return jnp.concatenate([prefix, grid], axis=1)


def torch_bicubic_matrix(size_in: int, size_out: int, a: float = -0.75) -> np.ndarray:
    """[size_out, size_in] matrix R with `R @ x` = torch's 1-D bicubic resize of x (align_corners=False).

    Output i samples the input at u = (i + ½)·size_in / size_out − ½ with the cubic convolution
    kernel of Keys (a = −0.75, torch's and ONNX's `cubic_coeff_a`) on the 4 taps ⌊u⌋ − 1 .. ⌊u⌋ + 2,
    indices clamped to the border (edge replication); no antialiasing, also when shrinking.
    """
    if size_in < 1 or size_out < 1:
        raise ValueError(f"sizes must be positive, got size_in={size_in}, size_out={size_out}")

    def kernel(d: np.ndarray) -> np.ndarray:
        d = np.abs(d)
        near = ((a + 2) * d - (a + 3)) * d * d + 1
        far = ((a * d - 5 * a) * d + 8 * a) * d - 4 * a
        return np.where(d <= 1, near, np.where(d < 2, far, 0.0))

    u = (np.arange(size_out, dtype=np.float64) + 0.5) * (size_in / size_out) - 0.5
    base = np.floor(u)
    matrix = np.zeros([size_out, size_in], np.float64)
    for tap in range(-1, 3):
        index = np.clip(base + tap, 0, size_in - 1).astype(np.int64)
        np.add.at(matrix, (np.arange(size_out), index), kernel(u - (base + tap)))
    return matrix.astype(np.float32)


def _posemb_sincos_2d(h: int, w: int, dim: int, temperature: float = 10_000.0) -> np.ndarray:
    """big_vision's fixed "sincos2d" embedding `[1, h*w, dim]`.

    For grid position (y, x) and frequency ω_k = temperature^(-k / (dim/4 - 1)), k < dim/4, the
    embedding is [sin(x ω), cos(x ω), sin(y ω), cos(y ω)] (MoCo v3), grid flattened row-major.
    """
    if dim % 4:
        raise ValueError(f"sincos2d position embedding needs a width divisible by 4, got {dim}")
    quarter = dim // 4
    omega = 1.0 / temperature ** (np.arange(quarter, dtype=np.float64) / max(quarter - 1, 1))
    ys, xs = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64), indexing="ij")
    x_angles = xs.reshape(-1, 1) * omega[None]
    y_angles = ys.reshape(-1, 1) * omega[None]
    table = np.concatenate([np.sin(x_angles), np.cos(x_angles), np.sin(y_angles), np.cos(y_angles)], axis=1)
    return table[None].astype(np.float32)


# ----------------------------------------------------------------------------------------------
# timm.


def _vit_config(
    num_classes, hidden, depth, mlp_dim, num_heads, patch, representation_size, distillation, layer_scale
) -> dict[str, Any]:
    """The `create_vit` config fields that a converter reads off a checkpoint's shapes and keys."""
    return dict(
        num_classes=num_classes,
        hidden_size=hidden,
        num_layers=depth,
        mlp_dim=mlp_dim,
        num_heads=num_heads,
        patch_size=tuple(patch),
        representation_size=representation_size,
        distillation_token=distillation,
        layer_scale_init=_LAYER_SCALE_PLACEHOLDER if layer_scale else None,
    )


def from_timm(
    state_dict: Mapping[str, Any],
    *,
    num_heads: int,
    image_size: Optional[ImageSize] = None,
    no_embed_class: Optional[bool] = None,
    global_pool: Optional[str] = None,
    distilled_cls_only: bool = False,
    ignore: Sequence[str] = (),
) -> tuple[Variables, Config]:
    """Converts a timm `VisionTransformer` state dict (ViT, DeiT, DeiT-III) into the Scenic layout.

    Mapping (timm → Scenic; Linear weights `[out, in]` are transposed to kernels `[in, out]`):

        patch_embed.proj        → embedding (OIHW → HWIO)
        cls_token, dist_token   → cls, dist
        pos_embed               → Transformer/posembed_input/pos_embedding
        blocks.i.norm1, norm2   → encoderblock_i/LayerNorm_0, LayerNorm_1
        blocks.i.attn.qkv       → MultiHeadDotProductAttention_0/{query,key,value}  [D, H, D/H]
        blocks.i.attn.proj      → MultiHeadDotProductAttention_0/out                [H, D/H, D]
        blocks.i.mlp.fc1, fc2   → MlpBlock_0/Dense_0, Dense_1
        blocks.i.ls1/ls2.gamma  → LayerScale_0/1/scale
        norm                    → Transformer/encoder_norm
        pre_logits.fc           → pre_logits (old timm `representation_size`)
        head                    → output_projection (absent or `num_classes=0`: features)

    Depth, width and MLP width come from the shapes; timm uses LayerNorm eps 1e-6 and exact GELU.
    Models with a class token become `classifier="token"`; models without one
    (`class_token=False, global_pool="avg", fc_norm=False`) become `"gap"`. A missing qkv bias
    (`qkv_bias=False`) becomes zeros.

    Not representable, so rejected as unexpected keys: `fc_norm` (timm's default for
    `global_pool="avg"` normalizes *after* pooling), `reg_token`, q/k norms, `norm_pre`.
    Distilled DeiT (`dist_token`, `head_dist`): timm averages the class- and distillation-token
    outputs (features and heads), the Scenic ViT reads the class token only; such checkpoints
    are rejected unless `distilled_cls_only=True`, which drops `head_dist` and gives a model
    equal to timm's `head(forward_features(x)[:, 0])`.

    Args:
      state_dict: `model.state_dict()`; torch tensors or numpy arrays.
      num_heads: attention heads (not recorded in the state dict), e.g. 3 for ViT-Ti, 6 for S.
      image_size: resize the position embedding to this input resolution (int or (h, w)).
      no_embed_class: whether `pos_embed` excludes the prefix tokens (timm `no_embed_class`,
        DeiT-III); inferred from its length when None (square grid with or without the prefix).
      global_pool: the timm model's `global_pool` ("token" or "avg"; not in the state dict);
        inferred from the presence of `cls_token` when None. "avg" with a class token (pooling
        the patch tokens only) is not representable and raises.
      distilled_cls_only: accept a distilled DeiT and keep its class-token path only (see above).
      ignore: key prefixes to drop before conversion.

    Returns:
      `({"params": tree}, config)`, with `config` the `ViT` keyword arguments.
    """
    source = "from_timm"
    flat = _drop_ignored({k: v for k, v in state_dict.items()}, ignore)
    if "dist_token" in flat:
        if not distilled_cls_only:
            raise ValueError(
                f"{source}: distilled DeiT (dist_token{', head_dist' if 'head_dist.weight' in flat else ''}): "
                "timm averages the cls and dist outputs, the Scenic ViT uses the cls token only; pass "
                "distilled_cls_only=True to convert the cls path (outputs then differ from timm's average)"
            )
        flat = _drop_ignored(flat, ("head_dist.",))
    keys = set(flat)
    depth = _block_count(source, keys, r"^blocks\.(\d+)\.")
    _required(source, flat, ["patch_embed.proj.weight", "pos_embed"])

    patch_weight = _to_numpy(flat["patch_embed.proj.weight"])
    hidden, _, ph, pw = patch_weight.shape
    _check_heads(source, hidden, num_heads)
    has_cls, has_dist = "cls_token" in flat, "dist_token" in flat
    if has_dist and not has_cls:
        raise ValueError(f"{source}: 'dist_token' without 'cls_token' is not supported")
    num_prefix = int(has_cls) + int(has_dist)
    if global_pool not in (None, "token", "avg"):
        raise ValueError(f"{source}: global_pool {global_pool!r} is not representable; expected 'token' or 'avg'")
    if global_pool is not None and (global_pool == "token") != has_cls:
        raise ValueError(
            f"{source}: global_pool={global_pool!r} with{'' if has_cls else 'out'} a class token is not "
            "representable: the Scenic ViT reads the class token ('token') or averages a sequence "
            "without one ('gap')"
        )
    layer_scale = "blocks.0.ls1.gamma" in flat
    qkv_bias = "blocks.0.attn.qkv.bias" in flat
    patch_bias = "patch_embed.proj.bias" in flat
    pre_logits = "pre_logits.fc.weight" in flat
    head = "head.weight" in flat

    expected = {"patch_embed.proj.weight", "pos_embed", "norm.weight", "norm.bias"}
    expected |= {"patch_embed.proj.bias"} if patch_bias else set()
    expected |= {"cls_token"} if has_cls else set()
    expected |= {"dist_token"} if has_dist else set()
    expected |= {"pre_logits.fc.weight", "pre_logits.fc.bias"} if pre_logits else set()
    expected |= {"head.weight", "head.bias"} if head else set()
    for i in range(depth):
        b = f"blocks.{i}."
        names = ["norm1", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"]
        expected |= {f"{b}{n}.{p}" for n in names for p in ("weight", "bias")}
        expected |= {f"{b}attn.qkv.weight"} | ({f"{b}attn.qkv.bias"} if qkv_bias else set())
        expected |= {f"{b}ls1.gamma", f"{b}ls2.gamma"} if layer_scale else set()
    hint = ""
    if "fc_norm.weight" in keys:
        hint = (
            "timm's fc_norm (global_pool='avg' with fc_norm) normalizes after pooling, which the Scenic "
            "'gap' ViT (encoder_norm, then mean) cannot express; use a model built with fc_norm=False."
        )
    _check_keys(source, keys, expected, hint)

    posemb = _to_numpy(flat["pos_embed"])
    num_tokens = posemb.shape[1]
    if no_embed_class is None:
        with_prefix = num_tokens > num_prefix and _square_grid(num_tokens - num_prefix) is not None
        if not num_prefix or with_prefix:
            no_embed_class = False
        elif _square_grid(num_tokens) is not None:
            no_embed_class = True
        else:
            raise ValueError(
                f"{source}: cannot tell whether pos_embed {posemb.shape} includes the {num_prefix} prefix "
                "token(s) (the grid is not square); pass no_embed_class=True or False"
            )
    if no_embed_class and num_prefix:
        # timm adds pos_embed to the patches only; a zero row for each prefix token is equivalent.
        posemb = np.concatenate([np.zeros((1, num_prefix, hidden), posemb.dtype), posemb], axis=1)
    posemb = _maybe_resize(source, posemb, num_prefix, (ph, pw), image_size)

    out: dict[str, Any] = {}
    for name, value in _patch_embedding(patch_weight, flat.get("patch_embed.proj.bias")).items():
        out[f"embedding/{name}"] = value
    if has_cls:
        out["cls"] = flat["cls_token"]
    if has_dist:
        out["dist"] = flat["dist_token"]
    out["Transformer/posembed_input/pos_embedding"] = posemb
    mlp_dim = _to_numpy(flat["blocks.0.mlp.fc1.weight"]).shape[0]
    for i in range(depth):
        b, s = f"blocks.{i}.", f"Transformer/encoderblock_{i}/"
        qkv_w = _to_numpy(flat[f"{b}attn.qkv.weight"])
        if qkv_w.shape != (3 * hidden, hidden):
            raise ValueError(f"{source}: {b}attn.qkv.weight has shape {qkv_w.shape}, expected {(3 * hidden, hidden)}")
        qkv_b = _to_numpy(flat[f"{b}attn.qkv.bias"]) if qkv_bias else np.zeros(3 * hidden, qkv_w.dtype)
        q_w, k_w, v_w = np.split(qkv_w, 3, axis=0)
        q_b, k_b, v_b = np.split(qkv_b, 3, axis=0)
        attn = _attention(
            (q_w, q_b), (k_w, k_b), (v_w, v_b), (flat[f"{b}attn.proj.weight"], flat[f"{b}attn.proj.bias"]), num_heads
        )
        parts: dict[str, Mapping[str, Any]] = {
            _LN0: _layer_norm(flat[f"{b}norm1.weight"], flat[f"{b}norm1.bias"]),
            _LN1: _layer_norm(flat[f"{b}norm2.weight"], flat[f"{b}norm2.bias"]),
            f"{_MLP}/Dense_0": _linear(flat[f"{b}mlp.fc1.weight"], flat[f"{b}mlp.fc1.bias"]),
            f"{_MLP}/Dense_1": _linear(flat[f"{b}mlp.fc2.weight"], flat[f"{b}mlp.fc2.bias"]),
            **{f"{_MHA}/{n}": p for n, p in attn.items()},
        }
        if layer_scale:
            parts["LayerScale_0"] = {"scale": flat[f"{b}ls1.gamma"]}
            parts["LayerScale_1"] = {"scale": flat[f"{b}ls2.gamma"]}
        _put_modules(out, s, parts)
    representation_size, num_classes = _put_top(
        out, flat, norm="norm", pre_logits="pre_logits.fc" if pre_logits else None, head="head" if head else None
    )

    sizes = (num_classes, hidden, depth, mlp_dim, num_heads, (ph, pw), representation_size)
    config = _vit_config(*sizes, has_dist, layer_scale)
    config.update(classifier="token" if has_cls else "gap", layer_norm_epsilon=1e-6, gelu_approximate=False)
    return _finish(out), config


# ----------------------------------------------------------------------------------------------
# Hugging Face transformers.

_HF_GELU = {"gelu": False, "gelu_new": True, "gelu_pytorch_tanh": True, "gelu_fast": True}

# Role of a block parameter → its names in the transformers 4.x layout (as on the Hub) and the
# 5.x layout; the first name present in block 0 is used for every block.
_HF_BLOCK_NAMES: dict[str, tuple[str, ...]] = {
    "q": ("attention.attention.query", "attention.q_proj"),
    "k": ("attention.attention.key", "attention.k_proj"),
    "v": ("attention.attention.value", "attention.v_proj"),
    "o": ("attention.output.dense", "attention.o_proj"),
    "ln0": ("layernorm_before", "norm1"),
    "ln1": ("layernorm_after", "norm2"),
    "fc1": ("intermediate.dense", "mlp.fc1"),
    "fc2": ("output.dense", "mlp.fc2"),
}
_HF_BLOCK_PREFIXES = (r"^encoder\.layer\.(\d+)\.", r"^layers\.(\d+)\.")


def _config_get(config: Any, name: str, default: Any = None) -> Any:
    if isinstance(config, Mapping):
        return config.get(name, default)
    return getattr(config, name, default)


def from_huggingface(
    state_dict: Mapping[str, Any],
    config: Any,
    *,
    image_size: Optional[ImageSize] = None,
    ignore: Sequence[str] = (),
) -> tuple[Variables, Config]:
    """Converts a Hugging Face ViT / DeiT / DINOv2 state dict into the Scenic layout.

    Accepted models: `ViTModel`, `ViTForImageClassification`, `DeiTModel`,
    `DeiTForImageClassification`, `Dinov2Model`, with or without the `vit.` / `deit.` /
    `dinov2.` prefix, in the transformers 4.x names (those of Hub checkpoints) or the 5.x names.
    Mapping (HF 4.x | 5.x → Scenic; Linear weights `[out, in]` transposed to kernels `[in, out]`):

        embeddings.patch_embeddings.projection     → embedding (OIHW → HWIO)
        embeddings.cls_token / distillation_token  → cls / dist
        embeddings.position_embeddings             → Transformer/posembed_input/pos_embedding
        encoder.layer.i. | layers.i. (ViT, DeiT 5.x)  → Transformer/encoderblock_i/
          layernorm_before | norm1 (DINOv2)        → LayerNorm_0
          attention.attention.{query,key,value} | attention.{q,k,v}_proj
                                                   → MultiHeadDotProductAttention_0/{query,key,value}
          attention.output.dense | attention.o_proj → MultiHeadDotProductAttention_0/out
          layer_scale1/2.lambda1 (DINOv2)          → LayerScale_0/1/scale
          layernorm_after | norm2                  → LayerNorm_1
          intermediate.dense | mlp.fc1             → MlpBlock_0/Dense_0
          output.dense | mlp.fc2                   → MlpBlock_0/Dense_1
        layernorm                                  → Transformer/encoder_norm
        pooler.dense                               → pre_logits (Dense + tanh = HF's pooler)
        classifier                                 → output_projection

    `embeddings.mask_token` (masked-image modelling only) is dropped. A missing qkv bias
    (`qkv_bias=False`) becomes zeros. With neither pooler nor classifier the model returns the
    normalized class token: DINOv2's `pooler_output`, `last_hidden_state[:, 0]` otherwise.

    Note: `Dinov2Model` always interpolates its position embedding (bicubic, in torch) to the
    input's grid, except at `config.image_size` (square inputs), where it needs none; the
    converted model holds the embedding for `config.image_size`, and `image_size=` here resizes
    it with `resize_pos_embedding` (bilinear), which is close to, not equal to, DINOv2's.

    Args:
      state_dict: `model.state_dict()`; torch tensors or numpy arrays.
      config: the model's `transformers` config (or its `to_dict()`): heads, LayerNorm eps
        (1e-12 for ViT/DeiT, 1e-6 for DINOv2), `hidden_act`, `pooler_act`.
      image_size: resize the position embedding to this input resolution.
      ignore: key prefixes to drop (after removing the model prefix) before conversion.
    """
    source = "from_huggingface"
    flat = {k: v for k, v in state_dict.items()}
    anchor = next((k for k in flat if k.endswith("embeddings.cls_token")), None)
    if anchor is None:
        raise ValueError(
            f"{source}: no 'embeddings.cls_token' key; this does not look like a HF ViT/DeiT/DINOv2 state dict. "
            f"Keys: {_format_keys(flat)}"
        )
    prefix = anchor[: -len("embeddings.cls_token")]
    flat = {(k[len(prefix) :] if prefix and k.startswith(prefix) else k): v for k, v in flat.items()}
    flat = _drop_ignored(flat, ignore)
    flat.pop("embeddings.mask_token", None)
    keys = set(flat)

    model_type = _config_get(config, "model_type", "vit")
    if model_type not in ("vit", "deit", "dinov2"):
        raise ValueError(f"{source}: model_type {model_type!r} is not supported; expected 'vit', 'deit' or 'dinov2'")
    if _config_get(config, "num_attention_heads") is None:
        raise ValueError(f"{source}: the config has no num_attention_heads; pass the model's transformers config")
    num_heads = int(_config_get(config, "num_attention_heads"))
    eps = float(_config_get(config, "layer_norm_eps", 1e-12))
    act = _config_get(config, "hidden_act", "gelu")
    if not isinstance(act, str) or act not in _HF_GELU:
        raise ValueError(f"{source}: hidden_act {act!r} is not supported; expected one of {sorted(_HF_GELU)}")
    if _config_get(config, "use_swiglu_ffn", False):
        raise ValueError(f"{source}: DINOv2 with use_swiglu_ffn=True (SwiGLU MLP) is not supported by the Scenic ViT")
    pooler_act = _config_get(config, "pooler_act", "tanh")

    block_pattern = next((p for p in _HF_BLOCK_PREFIXES if any(re.match(p, k) for k in keys)), None)
    if block_pattern is None:
        raise ValueError(
            f"{source}: found no transformer blocks (no key starts with 'encoder.layer.i.' or 'layers.i.'). "
            f"Keys: {_format_keys(keys)}"
        )
    depth = _block_count(source, keys, block_pattern)
    block_prefix = "encoder.layer." if block_pattern.startswith(r"^encoder") else "layers."
    first = f"{block_prefix}0."
    names = {
        role: next((n for n in candidates if f"{first}{n}.weight" in keys), candidates[0])
        for role, candidates in _HF_BLOCK_NAMES.items()
    }

    patch_key = "embeddings.patch_embeddings.projection.weight"
    _required(source, flat, [patch_key, "embeddings.position_embeddings"])
    patch_weight = _to_numpy(flat[patch_key])
    hidden, _, ph, pw = patch_weight.shape
    _check_heads(source, hidden, num_heads)
    has_dist = "embeddings.distillation_token" in keys
    num_prefix = 1 + int(has_dist)
    pooler = "pooler.dense.weight" in keys
    classifier = "classifier.weight" in keys and model_type != "dinov2"
    qkv_bias = f"{first}{names['q']}.bias" in keys
    layer_scale = f"{first}layer_scale1.lambda1" in keys
    if pooler and pooler_act != "tanh":
        raise ValueError(f"{source}: pooler_act {pooler_act!r} is not supported; the Scenic pre_logits is tanh")

    expected = {patch_key, "embeddings.patch_embeddings.projection.bias", "embeddings.cls_token"}
    expected |= {"embeddings.position_embeddings", "layernorm.weight", "layernorm.bias"}
    expected |= {"embeddings.distillation_token"} if has_dist else set()
    expected |= {"pooler.dense.weight", "pooler.dense.bias"} if pooler else set()
    expected |= {"classifier.weight", "classifier.bias"} if classifier else set()
    for i in range(depth):
        b = f"{block_prefix}{i}."
        expected |= {f"{b}{names[r]}.{p}" for r in ("ln0", "ln1", "fc1", "fc2", "o") for p in ("weight", "bias")}
        expected |= {f"{b}{names[r]}.weight" for r in ("q", "k", "v")}
        expected |= {f"{b}{names[r]}.bias" for r in ("q", "k", "v")} if qkv_bias else set()
        expected |= {f"{b}layer_scale1.lambda1", f"{b}layer_scale2.lambda1"} if layer_scale else set()
    hint = ""
    if "cls_classifier.weight" in keys or "distillation_classifier.weight" in keys:
        hint = (
            "DeiTForImageClassificationWithTeacher averages two heads, which the Scenic ViT cannot express; "
            "drop 'distillation_classifier' (ignore=) and rename 'cls_classifier' to 'classifier' to keep one."
        )
    elif model_type == "dinov2" and "classifier.weight" in keys:
        hint = "Dinov2ForImageClassification's head reads [cls, mean(patches)], which the Scenic ViT cannot express."
    _check_keys(source, keys, expected, hint)

    query_rows = _to_numpy(flat[f"{first}{names['q']}.weight"]).shape[0]
    if query_rows != hidden:
        raise ValueError(
            f"{source}: attention width {query_rows} (num_heads * head_dim) differs from the hidden size {hidden}; "
            "the Scenic ViT needs them equal"
        )
    posemb = _to_numpy(flat["embeddings.position_embeddings"])
    if posemb.shape[1] <= num_prefix:
        raise ValueError(f"{source}: position_embeddings {posemb.shape} has no grid tokens")
    posemb = _maybe_resize(source, posemb, num_prefix, (ph, pw), image_size)

    out: dict[str, Any] = {}
    for name, value in _patch_embedding(patch_weight, flat["embeddings.patch_embeddings.projection.bias"]).items():
        out[f"embedding/{name}"] = value
    out["cls"] = flat["embeddings.cls_token"]
    if has_dist:
        out["dist"] = flat["embeddings.distillation_token"]
    out["Transformer/posembed_input/pos_embedding"] = posemb

    def pair(block: str, role: str) -> tuple[Any, Optional[Any]]:
        return flat[f"{block}{names[role]}.weight"], flat.get(f"{block}{names[role]}.bias")

    mlp_dim = _to_numpy(flat[f"{first}{names['fc1']}.weight"]).shape[0]
    for i in range(depth):
        b, s = f"{block_prefix}{i}.", f"Transformer/encoderblock_{i}/"
        attn = _attention(pair(b, "q"), pair(b, "k"), pair(b, "v"), pair(b, "o"), num_heads)
        parts: dict[str, Mapping[str, Any]] = {
            _LN0: _layer_norm(*pair(b, "ln0")),
            _LN1: _layer_norm(*pair(b, "ln1")),
            f"{_MLP}/Dense_0": _linear(*pair(b, "fc1")),
            f"{_MLP}/Dense_1": _linear(*pair(b, "fc2")),
            **{f"{_MHA}/{n}": p for n, p in attn.items()},
        }
        if layer_scale:
            parts["LayerScale_0"] = {"scale": flat[f"{b}layer_scale1.lambda1"]}
            parts["LayerScale_1"] = {"scale": flat[f"{b}layer_scale2.lambda1"]}
        _put_modules(out, s, parts)
    representation_size, num_classes = _put_top(
        out,
        flat,
        norm="layernorm",
        pre_logits="pooler.dense" if pooler else None,
        head="classifier" if classifier else None,
    )

    sizes = (num_classes, hidden, depth, mlp_dim, num_heads, (ph, pw), representation_size)
    config_out = _vit_config(*sizes, has_dist, layer_scale)
    config_out.update(classifier="token", layer_norm_epsilon=eps, gelu_approximate=_HF_GELU[act])
    return _finish(out), config_out


# ----------------------------------------------------------------------------------------------
# Flax checkpoints: AugReg .npz and big_vision.

_AUGREG_RENAMES = (
    ("/MultiHeadDotProductAttention_1/", f"/{_MHA}/"),
    ("/MlpBlock_3/", f"/{_MLP}/"),
    ("/LayerNorm_2/", f"/{_LN1}/"),
)


def _scenic_block_keys(prefix: str, layer_scale: bool = False) -> set[str]:
    keys = {f"{prefix}{ln}/{p}" for ln in (_LN0, _LN1) for p in ("scale", "bias")}
    keys |= {f"{prefix}{_MHA}/{n}/{p}" for n in ("query", "key", "value", "out") for p in ("kernel", "bias")}
    keys |= {f"{prefix}{_MLP}/{d}/{p}" for d in ("Dense_0", "Dense_1") for p in ("kernel", "bias")}
    if layer_scale:
        keys |= {f"{prefix}LayerScale_0/scale", f"{prefix}LayerScale_1/scale"}
    return keys


def _strip_params_wrapper(flat: dict[str, Any]) -> dict[str, Any]:
    """Drops a leading `params/` (a `{"params": ...}` variables dict or an npz saved from one)."""
    if flat and all(k.startswith("params/") for k in flat):
        return {k[len("params/") :]: v for k, v in flat.items()}
    return flat


def _config_from_scenic(source: str, flat: Mapping[str, Any], gelu_approximate: bool) -> Config:
    """Reads the architecture from a Scenic-named flat tree (query kernel gives the heads)."""
    depth = _block_count(source, flat, r"^Transformer/encoderblock_(\d+)/")
    b = "Transformer/encoderblock_0/"
    query = np.shape(flat[f"{b}{_MHA}/query/kernel"])
    hidden, heads = int(query[0]), int(query[1])
    patch = np.shape(flat["embedding/kernel"])
    return dict(
        num_classes=int(np.shape(flat["output_projection/kernel"])[1]) if "output_projection/kernel" in flat else None,
        hidden_size=hidden,
        num_layers=depth,
        mlp_dim=int(np.shape(flat[f"{b}{_MLP}/Dense_0/kernel"])[1]),
        num_heads=heads,
        patch_size=(int(patch[0]), int(patch[1])),
        classifier="token" if "cls" in flat else "gap",
        representation_size=int(np.shape(flat["pre_logits/kernel"])[1]) if "pre_logits/kernel" in flat else None,
        distillation_token="dist" in flat,
        layer_scale_init=_LAYER_SCALE_PLACEHOLDER if f"{b}LayerScale_0/scale" in flat else None,
        layer_norm_epsilon=1e-6,
        gelu_approximate=gelu_approximate,
    )


def _expected_scenic_keys(flat: Mapping[str, Any], depth: int) -> set[str]:
    layer_scale = "Transformer/encoderblock_0/LayerScale_0/scale" in flat
    expected = {"embedding/kernel", "embedding/bias", "Transformer/posembed_input/pos_embedding"}
    expected |= {"Transformer/encoder_norm/scale", "Transformer/encoder_norm/bias"}
    for optional in ("cls", "dist"):
        expected |= {optional} if optional in flat else set()
    for optional in ("pre_logits", "output_projection"):
        expected |= {f"{optional}/kernel", f"{optional}/bias"} if f"{optional}/kernel" in flat else set()
    for i in range(depth):
        expected |= _scenic_block_keys(f"Transformer/encoderblock_{i}/", layer_scale)
    return expected


def from_augreg_npz(
    npz: Union[str, os.PathLike, Mapping[str, Any]],
    *,
    image_size: Optional[ImageSize] = None,
    gelu_approximate: bool = True,
) -> tuple[Variables, Config]:
    """Converts an AugReg / google-research/vision_transformer `.npz` into the Scenic layout.

    The file holds flat keys such as
    `Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel` in the pre-Linen
    names, which are renamed (Scenic's names, as written by a Linen export, are accepted too):

        MultiHeadDotProductAttention_1 → MultiHeadDotProductAttention_0
        MlpBlock_3                     → MlpBlock_0
        LayerNorm_2                    → LayerNorm_1  (LayerNorm_0 keeps its name)
        head                           → output_projection
        embedding, cls, pre_logits, Transformer/posembed_input, Transformer/encoder_norm: unchanged

    The arrays are already in flax shapes. No `cls` means a "gap" model. These checkpoints were
    trained with tanh-approximated GELU and LayerNorm eps 1e-6 (timm runs them with exact GELU,
    which differs slightly).

    Args:
      npz: a path to the `.npz`, an opened `np.load` result, or a dict of its flat keys (a nested
        dict is flattened with "/").
      image_size: resize the position embedding to this input resolution.
      gelu_approximate: GELU of the model in `config` (True as in the original code).
    """
    source = "from_augreg_npz"
    if isinstance(npz, (str, os.PathLike)):
        with np.load(npz) as data:
            flat = {k: np.asarray(data[k]) for k in data.files}
    else:
        flat = _flatten(npz)
    flat = _strip_params_wrapper(flat)
    renamed: dict[str, Any] = {}
    for key, value in flat.items():
        new = key
        if new.startswith("Transformer/encoderblock_"):
            for old, scenic in _AUGREG_RENAMES:
                new = new.replace(old, scenic)
        elif new.startswith("head/"):
            new = "output_projection/" + new[len("head/") :]
        if new in renamed:
            raise ValueError(f"{source}: keys {key!r} and another key both map to {new!r}")
        renamed[new] = _to_numpy(value)
    _required(source, renamed, ["embedding/kernel", "Transformer/posembed_input/pos_embedding"])
    depth = _block_count(source, renamed, r"^Transformer/encoderblock_(\d+)/")
    hint = "Hybrid (ResNet + ViT) checkpoints are not supported." if "conv_root/kernel" in renamed else ""
    # Check in the file's own names, so that the error lists keys as they appear in it.
    pre_linen = any(old in f"/{k}" for k in flat for old, _ in _AUGREG_RENAMES)
    head_named = any(k.startswith("head/") for k in flat) or not any(k.startswith("output_projection/") for k in flat)

    def file_name(key: str) -> str:
        if pre_linen and key.startswith("Transformer/encoderblock_"):
            for old, scenic in _AUGREG_RENAMES:
                key = key.replace(scenic, old)
        if head_named and key.startswith("output_projection/"):
            key = "head/" + key[len("output_projection/") :]
        return key

    _check_keys(source, flat, {file_name(k) for k in _expected_scenic_keys(renamed, depth)}, hint)
    config = _config_from_scenic(source, renamed, gelu_approximate)
    num_prefix = int("cls" in renamed) + int("dist" in renamed)
    key = "Transformer/posembed_input/pos_embedding"
    renamed[key] = _maybe_resize(source, renamed[key], num_prefix, config["patch_size"], image_size)
    return _finish(renamed), config


def unstack_scanned(params: Any) -> dict[str, Any]:
    """Splits `nn.scan`-stacked blocks `.../encoderblock/...` (leading depth axis) into `encoderblock_i`.

    big_vision's `scan=True` ViT stores every block parameter once, as `[depth, ...]`, under
    `Transformer/encoderblock`; this returns the same tree with `Transformer/encoderblock_0`,
    ..., `encoderblock_{depth-1}` holding the slices. Trees without stacked blocks come back
    unchanged (as nested dicts).

    Args:
      params: a nested dict (or a flat dict with "/"-joined keys) of arrays.

    Returns:
      A nested dict of arrays.
    """
    flat = _flatten(params)
    out: dict[str, Any] = {}
    depths: dict[str, int] = {}
    for key, value in flat.items():
        parts = key.split("/")
        if "encoderblock" not in parts:
            out[key] = value
            continue
        pos = parts.index("encoderblock")
        array = _to_numpy(value)
        if array.ndim == 0:
            raise ValueError(f"unstack_scanned: {key!r} is a scalar and has no leading depth axis")
        depths[key] = array.shape[0]
        for i in range(array.shape[0]):
            new = "/".join(parts[:pos] + [f"encoderblock_{i}"] + parts[pos + 1 :])
            if new in out or new in flat:
                raise ValueError(f"unstack_scanned: {new!r} exists both stacked and unstacked")
            out[new] = array[i]
    if len(set(depths.values())) > 1:
        by_depth = {d: k for k, d in depths.items()}
        raise ValueError(f"unstack_scanned: stacked blocks disagree on depth: {by_depth}")
    return _unflatten(out)


def from_big_vision(
    params: Any,
    *,
    image_size: Optional[ImageSize] = None,
    posemb: Optional[str] = None,
    pool_type: Optional[str] = None,
    gelu_approximate: bool = True,
) -> tuple[Variables, Config]:
    """Converts a big_vision ViT parameter tree (`big_vision/models/vit.py`) into the Scenic layout.

    big_vision keeps the block names of the Scenic layout and differs at the top:

        pos_embedding [1, h*w, D] (patches only)  → Transformer/posembed_input/pos_embedding with a
                                                     zero row in front for `cls` (big_vision adds the
                                                     embedding before prepending `cls`: equivalent)
        head                                       → output_projection
        Transformer/encoderblock/... [depth, ...]  → Transformer/encoderblock_i/... (`scan=True`)

    Key errors name big_vision's keys; those of a scanned tree appear unstacked (`encoderblock_i`).

    Older trees with `Transformer/posembed_input/pos_embedding` or `Transformer/pos_embedding`,
    or with the `cls` row included (`1 + h*w` tokens), are accepted as they are.

    Args:
      params: the parameter tree: nested dict, `{"params": tree}`, or flat "/"-joined keys.
      image_size: input resolution; resizes a learned embedding, and is required for
        `posemb="sincos2d"` (fixed embedding, not stored in the tree).
      posemb: "learn" or "sincos2d"; inferred from the presence of `pos_embedding` when None.
      pool_type: "tok" or "gap"; inferred from the presence of `cls` when None. "map" and "0"
        are not representable in the Scenic ViT.
      gelu_approximate: GELU of the model in `config` (big_vision uses `nn.gelu`, tanh-approximate).
    """
    source = "from_big_vision"
    flat = _strip_params_wrapper(_flatten(params))
    if any("/encoderblock/" in f"/{k}" for k in flat):
        flat = _flatten(unstack_scanned(flat))
    flat = {k: _to_numpy(v) for k, v in flat.items()}
    if "MAPHead_0/probe" in flat or pool_type == "map":
        hint = "big_vision pool_type='map' (MAPHead) is not representable in the Scenic ViT."
        _check_keys(source, flat, set(flat) - {k for k in flat if k.startswith("MAPHead_0/")}, hint)
        raise ValueError(f"{source}: {hint}")
    if pool_type not in (None, "tok", "gap"):
        raise ValueError(f"{source}: pool_type {pool_type!r} is not representable; expected 'tok' or 'gap'")
    if posemb not in (None, "learn", "sincos2d"):
        raise ValueError(f"{source}: posemb {posemb!r} is unknown; expected 'learn' or 'sincos2d'")

    # Rename to the Scenic layout.
    scenic: dict[str, Any] = {}
    posemb_keys = ("pos_embedding", "Transformer/pos_embedding", "Transformer/posembed_input/pos_embedding")
    found = [k for k in posemb_keys if k in flat]
    if len(found) > 1:
        raise ValueError(f"{source}: several position embeddings {found}")
    for key, value in flat.items():
        if key in posemb_keys:
            continue
        scenic["output_projection/" + key[len("head/") :] if key.startswith("head/") else key] = value
    has_cls = "cls" in scenic
    if pool_type == "tok" and not has_cls:
        _check_keys(source, scenic, set(scenic) | {"cls"}, "pool_type='tok' needs the 'cls' token.")
    if pool_type == "gap" and has_cls:
        _check_keys(source, scenic, set(scenic) - {"cls"}, "pool_type='gap' has no 'cls' token.")
    _required(source, scenic, ["embedding/kernel"])
    depth = _block_count(source, scenic, r"^Transformer/encoderblock_(\d+)/")
    hidden = int(scenic["embedding/kernel"].shape[-1])
    patch = scenic["embedding/kernel"].shape[:2]

    if found and posemb == "sincos2d":
        raise ValueError(f"{source}: posemb='sincos2d' but the tree has a learned {found[0]!r}")
    if found:
        table = flat[found[0]]
        grid_tokens = table.shape[1]
        if has_cls and _square_grid(grid_tokens) is not None:
            table = np.concatenate([np.zeros((1, 1, hidden), table.dtype), table], axis=1)
        elif has_cls and _square_grid(grid_tokens - 1) is None:
            raise ValueError(
                f"{source}: cannot tell whether {found[0]!r} {table.shape} includes the cls token (grid not square)"
            )
        table = _maybe_resize(source, table, int(has_cls), (int(patch[0]), int(patch[1])), image_size)
    elif posemb == "sincos2d":
        if image_size is None:
            raise ValueError(f"{source}: posemb='sincos2d' needs image_size to build the fixed embedding")
        h, w = _image_hw(image_size)
        table = _posemb_sincos_2d(h // int(patch[0]), w // int(patch[1]), hidden)
        if has_cls:
            table = np.concatenate([np.zeros((1, 1, hidden), table.dtype), table], axis=1)
    else:
        hint = "Models trained with posemb='sincos2d' store none: pass posemb='sincos2d' and image_size."
        _check_keys(source, scenic, set(scenic) | {"pos_embedding"}, hint)
        raise AssertionError("unreachable")
    scenic["Transformer/posembed_input/pos_embedding"] = table

    # Check in big_vision's names (blocks of a scanned tree appear unstacked, encoderblock_i).
    def tree_name(key: str) -> str:
        if key == "Transformer/posembed_input/pos_embedding":
            return found[0] if found else "pos_embedding (sincos2d)"
        return "head/" + key[len("output_projection/") :] if key.startswith("output_projection/") else key

    expected = {tree_name(k) for k in _expected_scenic_keys(scenic, depth)}
    _check_keys(source, {tree_name(k) for k in scenic}, expected)
    config = _config_from_scenic(source, scenic, gelu_approximate)
    return _finish(scenic), config


# ----------------------------------------------------------------------------------------------


def build_model(config: Mapping[str, Any]) -> ViT:
    """`ViT(**config)` for a config returned by a converter (unknown keys raise `TypeError`)."""
    fields = set(ViT.__dataclass_fields__) - {"parent", "name"}
    unknown = sorted(set(config) - fields)
    if unknown:
        raise TypeError(f"build_model: unknown ViT option(s) {unknown}; valid options are {sorted(fields)}")
    kwargs = dict(config)
    if "patch_size" in kwargs:
        kwargs["patch_size"] = tuple(kwargs["patch_size"])
    return ViT(**kwargs)
