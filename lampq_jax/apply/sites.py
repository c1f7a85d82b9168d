"""Quantization sites of a model run: layer inputs and the attention matmul inputs.

A *site* is one tensor whose values get quantized, named by a string:

    '<layer path>'                   the input activation of a Dense / DenseGeneral / Conv / Einsum
    '<attention path>/q', '/k', '/v'  inputs of q·kᵀ and softmax·v of nn.MultiHeadDotProductAttention
    (the softmax output has its own hook, `on_softmax`: a log-grid quantizer on [0, 1], no calibration)

`site_interceptor` runs an unchanged flax.linen model and hands every site's tensor to a
callback that may replace it; calibration, fake quantization and the Fisher pass are all
such callbacks.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from lampq_jax.layers.discovery import layer_kind, module_path

ATTENTION_INPUTS: tuple[str, ...] = ("q", "k", "v")

# site name, tensor → tensor (may be the same tensor)
SiteFn = Callable[[str, jax.Array], jax.Array]
# attention path, attention weights [batch, heads, q, k] → attention weights
SoftmaxFn = Callable[[str, jax.Array], jax.Array]


def _attention_fn(path: str, on_site: SiteFn, on_softmax: Optional[SoftmaxFn]) -> Callable[..., jax.Array]:
    """An `attention_fn` for nn.MultiHeadDotProductAttention with hooks on q, k, v and the softmax output."""

    def attention(
        query,
        key,
        value,
        bias=None,
        mask=None,
        broadcast_dropout=True,
        dropout_rng=None,
        dropout_rate=0.0,
        deterministic=False,
        dtype=None,
        precision=None,
        module=None,
        force_fp32_for_softmax=False,
    ):
        query = on_site(f"{path}/q", query)
        key = on_site(f"{path}/k", key)
        value = on_site(f"{path}/v", value)
        weights = nn.dot_product_attention_weights(
            query,
            key,
            bias=bias,
            mask=mask,
            broadcast_dropout=broadcast_dropout,
            dropout_rng=dropout_rng,
            dropout_rate=dropout_rate,
            deterministic=deterministic,
            dtype=dtype,
            precision=precision,
            module=module,
            **({"force_fp32_for_softmax": True} if force_fp32_for_softmax else {}),
        )
        if on_softmax is not None:
            weights = on_softmax(path, weights)
        return jnp.einsum("...hqk,...khd->...qhd", weights, value, precision=precision)

    return attention


@contextlib.contextmanager
def _swapped_attention_fn(module: nn.Module, fn: Callable[..., jax.Array]):
    """Temporarily replaces a bound attention module's `attention_fn` (the module is otherwise unchanged)."""
    original = module.attention_fn
    object.__setattr__(module, "attention_fn", fn)
    try:
        yield
    finally:
        object.__setattr__(module, "attention_fn", original)


def site_interceptor(
    on_site: SiteFn,
    *,
    layer_paths: Optional[frozenset[str]] = None,
    attention_paths: Optional[frozenset[str]] = None,
    on_softmax: Optional[SoftmaxFn] = None,
    on_layer: Optional[Callable[[str, nn.Module], None]] = None,
):
    """A method interceptor for `nn.intercept_methods` that exposes every site to `on_site`.

    Args:
      on_site: called as `on_site(site, x)` with the layer's input `x` (before the layer runs)
        or with q, k, v of an attention; its return value replaces the tensor.
      layer_paths: layers to intercept (None: all Dense / DenseGeneral / Conv / Einsum).
      attention_paths: attention modules to intercept (None: all; empty: none).
      on_softmax: called with the softmax output [batch, heads, q, k] of each attention.
      on_layer: called as `on_layer(path, module)` for each intercepted layer call.
    """

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        if isinstance(module, nn.MultiHeadDotProductAttention):
            path = module_path(module)
            if attention_paths is not None and path not in attention_paths:
                return next_fun(*args, **kwargs)
            with _swapped_attention_fn(module, _attention_fn(path, on_site, on_softmax)):
                return next_fun(*args, **kwargs)
        if layer_kind(module) is None or not args:
            return next_fun(*args, **kwargs)
        path = module_path(module)
        if layer_paths is not None and path not in layer_paths:
            return next_fun(*args, **kwargs)
        if on_layer is not None:
            on_layer(path, module)
        return next_fun(on_site(path, args[0]), *args[1:], **kwargs)

    return interceptor


def find_attention_paths(model: nn.Module, variables: Any, *args: Any, **apply_kwargs: Any) -> list[str]:
    """Paths of every nn.MultiHeadDotProductAttention the model calls, in call order (abstract run)."""
    paths: list[str] = []

    def interceptor(next_fun, call_args, call_kwargs, context):
        if context.method_name == "__call__" and isinstance(context.module, nn.MultiHeadDotProductAttention):
            path = module_path(context.module)
            if path not in paths:
                paths.append(path)
        return next_fun(*call_args, **call_kwargs)

    def run(variables):
        with nn.intercept_methods(interceptor):
            return model.apply(variables, *args, **apply_kwargs)

    jax.eval_shape(run, variables)
    return paths
