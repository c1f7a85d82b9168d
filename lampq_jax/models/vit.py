"""Vision Transformer in Scenic's exact parameter layout.

The parameter tree of `ViT` matches `scenic/projects/baselines/vit.py`:

    embedding/{kernel,bias}                       Conv, patchify        [ph, pw, C, D]
    cls                                           class token           [1, 1, D]
    Transformer/posembed_input/pos_embedding                            [1, T, D]
    Transformer/encoderblock_i/LayerNorm_0
    Transformer/encoderblock_i/MultiHeadDotProductAttention_0/{query,key,value}  [D, H, D/H]
    Transformer/encoderblock_i/MultiHeadDotProductAttention_0/out                [H, D/H, D]
    Transformer/encoderblock_i/LayerNorm_1
    Transformer/encoderblock_i/MlpBlock_0/{Dense_0,Dense_1}
    Transformer/encoder_norm
    pre_logits/{kernel,bias}                      only with representation_size
    output_projection/{kernel,bias}               only with num_classes

Additions that Scenic lacks, all off by default so the layout above is unchanged:
LayerScale (`encoderblock_i/LayerScale_{0,1}/scale`, DeiT-III / DINOv2), a distillation
token (`dist`, DeiT), exact GELU and other LayerNorm epsilons (timm / Hugging Face).

Example:
    >>> model = create_vit("Ti/16", num_classes=10)
    >>> variables = model.init(jax.random.key(0), jnp.zeros([1, 224, 224, 3]), train=False)
    >>> logits = model.apply(variables, images, train=False)  # images: [batch, H, W, C]
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

# name: (hidden_size, num_layers, mlp_dim, num_heads); big_vision's table.
VIT_SIZES: dict[str, tuple[int, int, int, int]] = {
    "mu": (32, 1, 128, 2),
    "Ti": (192, 12, 768, 3),
    "S": (384, 12, 1536, 6),
    "M": (512, 12, 2048, 8),
    "B": (768, 12, 3072, 12),
    "L": (1024, 24, 4096, 16),
    "H": (1280, 32, 5120, 16),
    "g": (1408, 40, 6144, 16),
    "G": (1664, 48, 8192, 16),
}


class AddPositionEmbs(nn.Module):
    """Adds a learned position embedding `pos_embedding: [1, tokens, dim]`."""

    posemb_init: Callable[..., Any] = nn.initializers.normal(stddev=0.02)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        pos = self.param("pos_embedding", self.posemb_init, (1, x.shape[1], x.shape[2]), x.dtype)
        return x + pos


class LayerScale(nn.Module):
    """Multiplies by a learned per-channel `scale: [dim]` (DeiT-III, DINOv2)."""

    init_value: float = 1e-5

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.initializers.constant(self.init_value), (x.shape[-1],))
        return x * scale.astype(x.dtype)


class MlpBlock(nn.Module):
    """Dense_0 → GELU → dropout → Dense_1 → dropout (Scenic's `attention_layers.MlpBlock`)."""

    mlp_dim: int
    dropout_rate: float = 0.0
    gelu_approximate: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, deterministic: bool) -> jax.Array:
        dim = x.shape[-1]
        y = nn.Dense(
            self.mlp_dim,
            dtype=self.dtype,
            kernel_init=nn.initializers.xavier_uniform(),
            bias_init=nn.initializers.normal(stddev=1e-6),
        )(x)
        y = nn.gelu(y, approximate=self.gelu_approximate)
        y = nn.Dropout(rate=self.dropout_rate)(y, deterministic=deterministic)
        y = nn.Dense(
            dim,
            dtype=self.dtype,
            kernel_init=nn.initializers.xavier_uniform(),
            bias_init=nn.initializers.normal(stddev=1e-6),
        )(y)
        return nn.Dropout(rate=self.dropout_rate)(y, deterministic=deterministic)


class Encoder1DBlock(nn.Module):
    """Pre-norm transformer block: x + Attn(LN(x)), then x + MLP(LN(x))."""

    mlp_dim: int
    num_heads: int
    dropout_rate: float = 0.0
    attention_dropout_rate: float = 0.0
    layer_scale_init: Optional[float] = None
    layer_norm_epsilon: float = 1e-6
    gelu_approximate: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, inputs: jax.Array, *, deterministic: bool) -> jax.Array:
        x = nn.LayerNorm(epsilon=self.layer_norm_epsilon, dtype=self.dtype)(inputs)
        x = nn.MultiHeadDotProductAttention(
            num_heads=self.num_heads,
            dtype=self.dtype,
            kernel_init=nn.initializers.xavier_uniform(),
            broadcast_dropout=False,
            dropout_rate=self.attention_dropout_rate,
            deterministic=deterministic,
        )(x, x)
        x = nn.Dropout(rate=self.dropout_rate)(x, deterministic=deterministic)
        if self.layer_scale_init is not None:
            x = LayerScale(self.layer_scale_init)(x)
        x = x + inputs
        y = nn.LayerNorm(epsilon=self.layer_norm_epsilon, dtype=self.dtype)(x)
        y = MlpBlock(
            mlp_dim=self.mlp_dim,
            dropout_rate=self.dropout_rate,
            gelu_approximate=self.gelu_approximate,
            dtype=self.dtype,
        )(y, deterministic=deterministic)
        if self.layer_scale_init is not None:
            y = LayerScale(self.layer_scale_init)(y)
        return x + y


class Encoder(nn.Module):
    """Position embedding, `num_layers` blocks named `encoderblock_i`, `encoder_norm`."""

    mlp_dim: int
    num_layers: int
    num_heads: int
    dropout_rate: float = 0.0
    attention_dropout_rate: float = 0.0
    layer_scale_init: Optional[float] = None
    layer_norm_epsilon: float = 1e-6
    gelu_approximate: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        x = AddPositionEmbs(name="posembed_input")(x)
        x = nn.Dropout(rate=self.dropout_rate)(x, deterministic=not train)
        for i in range(self.num_layers):
            x = Encoder1DBlock(
                mlp_dim=self.mlp_dim,
                num_heads=self.num_heads,
                dropout_rate=self.dropout_rate,
                attention_dropout_rate=self.attention_dropout_rate,
                layer_scale_init=self.layer_scale_init,
                layer_norm_epsilon=self.layer_norm_epsilon,
                gelu_approximate=self.gelu_approximate,
                dtype=self.dtype,
                name=f"encoderblock_{i}",
            )(x, deterministic=not train)
        return nn.LayerNorm(epsilon=self.layer_norm_epsilon, dtype=self.dtype, name="encoder_norm")(x)


class ViT(nn.Module):
    """Vision Transformer with Scenic's parameter names.

    Attributes:
      num_classes: size of `output_projection`; None returns the pooled representation
        (after `pre_logits` when `representation_size` is set), as feature models do.
      patch_size: (ph, pw) of the patchifying `embedding` convolution.
      classifier: "token" (class token at position 0) or "gap" (mean over tokens).
      representation_size: width of the `pre_logits` Dense + tanh, or None for none.
      distillation_token: adds a `dist` token after `cls` (DeiT); only the `cls` output is used.
      layer_scale_init: LayerScale's initial value, or None for no LayerScale.
      return_tokens: with `num_classes=None`, return every token after `encoder_norm`,
        `[batch, tokens, width]` (dense tasks, DINOv2 features) instead of the pooled one.
    """

    num_classes: Optional[int]
    hidden_size: int
    num_layers: int
    mlp_dim: int
    num_heads: int
    patch_size: tuple[int, int] = (16, 16)
    classifier: str = "token"
    representation_size: Optional[int] = None
    dropout_rate: float = 0.0
    attention_dropout_rate: float = 0.0
    distillation_token: bool = False
    layer_scale_init: Optional[float] = None
    layer_norm_epsilon: float = 1e-6
    gelu_approximate: bool = True
    return_tokens: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        """Runs the model on `x: [batch, height, width, channels]` (NHWC).

        Returns:
          `[batch, num_classes]` logits, or `[batch, width]` features when `num_classes` is None,
          or `[batch, tokens, width]` with `return_tokens`.
        """
        if x.ndim != 4:
            raise ValueError(f"ViT expects NHWC images of rank 4, got shape {x.shape}")
        if self.classifier not in ("token", "gap"):
            raise ValueError(f"classifier must be 'token' or 'gap', got {self.classifier!r}")
        if self.return_tokens and (self.num_classes is not None or self.representation_size is not None):
            raise ValueError(
                f"return_tokens=True returns the encoder's tokens, so it needs num_classes=None and "
                f"representation_size=None, got {self.num_classes} and {self.representation_size}"
            )
        ph, pw = self.patch_size
        x = nn.Conv(self.hidden_size, (ph, pw), strides=(ph, pw), padding="VALID", dtype=self.dtype, name="embedding")(
            x
        )
        n, h, w, c = x.shape
        x = jnp.reshape(x, [n, h * w, c])
        if self.classifier == "token":
            extra = [self.param("cls", nn.initializers.zeros, (1, 1, c), x.dtype)]
            if self.distillation_token:
                extra.append(self.param("dist", nn.initializers.zeros, (1, 1, c), x.dtype))
            x = jnp.concatenate([jnp.tile(t, [n, 1, 1]) for t in extra] + [x], axis=1)
        x = Encoder(
            mlp_dim=self.mlp_dim,
            num_layers=self.num_layers,
            num_heads=self.num_heads,
            dropout_rate=self.dropout_rate,
            attention_dropout_rate=self.attention_dropout_rate,
            layer_scale_init=self.layer_scale_init,
            layer_norm_epsilon=self.layer_norm_epsilon,
            gelu_approximate=self.gelu_approximate,
            dtype=self.dtype,
            name="Transformer",
        )(x, train=train)
        if self.return_tokens:
            return x
        x = x[:, 0] if self.classifier == "token" else jnp.mean(x, axis=1)
        if self.representation_size is not None:
            x = jnp.tanh(nn.Dense(self.representation_size, dtype=self.dtype, name="pre_logits")(x))
        if self.num_classes is None:
            return x
        return nn.Dense(
            self.num_classes, dtype=self.dtype, kernel_init=nn.initializers.zeros, name="output_projection"
        )(x)


_VARIANT = re.compile(r"^(?P<size>[A-Za-z]+)/(?P<patch>\d+)$")


def decode_variant(variant: str) -> dict[str, Any]:
    """Decodes "S/16" into ViT keyword arguments (hidden_size, num_layers, mlp_dim, num_heads, patch_size)."""
    match = _VARIANT.match(variant)
    if match is None or match["size"] not in VIT_SIZES:
        raise ValueError(
            f"unknown ViT variant {variant!r}: expected '<size>/<patch>' with size in {sorted(VIT_SIZES)}, e.g. 'B/16'"
        )
    hidden, layers, mlp, heads = VIT_SIZES[match["size"]]
    patch = int(match["patch"])
    return dict(hidden_size=hidden, num_layers=layers, mlp_dim=mlp, num_heads=heads, patch_size=(patch, patch))


def create_vit(variant: str, num_classes: Optional[int], **overrides: Any) -> ViT:
    """Builds a `ViT` from a variant name such as "Ti/16", "S/16", "B/16", "L/16", "S/14", "B/8".

    Args:
      variant: "<size>/<patch>", size one of `VIT_SIZES`.
      num_classes: classes of `output_projection`, or None for a feature model.
      **overrides: any `ViT` field, e.g. `representation_size=768`, `classifier="gap"`,
        `num_layers=6`, `layer_scale_init=1e-5`.
    """
    fields = {f.name for f in dataclasses.fields(ViT)} - {"parent", "name"}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise TypeError(f"unknown ViT option(s) {unknown}; valid options are {sorted(fields)}")
    kwargs = decode_variant(variant)
    if "patch_size" in overrides and isinstance(overrides["patch_size"], int):
        overrides = {**overrides, "patch_size": (overrides["patch_size"],) * 2}
    kwargs.update(overrides)
    return ViT(num_classes=num_classes, **kwargs)
