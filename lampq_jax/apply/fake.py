"""Fake quantization of an unchanged flax.linen model through `nn.intercept_methods`.

`QuantSpec` (static, hashable) says what is quantized at how many bits:

    layers:    (path, weight bits, activation bits) per layer; weights per output channel with a
               clipping search, the layer's input per tensor with calibrated ranges
    attention: (path, bits) per nn.MultiHeadDotProductAttention; q, k, v uniform per tensor,
               the softmax output on a log grid of base 2^(1/k) (`quant.traced.softmax_dynamic`)

Weights are quantized once (`quantize_weights`: codes and grid, kept by `QuantizedModel.weights`;
`fake_quantize_params`: their dequantized values) and the interceptor quantizes only activations.
For training code, `quantized_apply(..., ste=True)` quantizes weights inside the
forward with straight-through gradients, so `jax.grad` reaches the float weights.

Example:
    >>> spec = QuantSpec.build(layers, bits={l.path: (4, 4) for l in layers}, attention_bits={...})
    >>> qvars = fake_quantize_params(variables, layers, spec)
    >>> with nn.intercept_methods(activation_interceptor(spec, act_params)):
    ...     logits = model.apply(qvars, images, train=False)
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Mapping, NamedTuple, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.traverse_util import flatten_dict, unflatten_dict

from lampq_jax.apply.calibration import ActivationParams
from lampq_jax.apply.sites import site_interceptor
from lampq_jax.layers.discovery import Layer
from lampq_jax.quant.gptq import gptq_round
from lampq_jax.quant.traced import softmax_dynamic
from lampq_jax.quant.qtensor import QuantizedTensor
from lampq_jax.quant import (
    DEFAULT_CLIP_RATIOS,
    UniformParams,
    as_compute,
    check_bits,
    dequantize,
    fake_quant,
    fake_quant_ste,
    num_levels,
    quantize_levels,
    search_clipping_levels,
    search_clipping_params,
    weight_reduce_axes,
)

LayerBits = tuple[str, int, int]


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantSpec:
    """What to quantize, at how many bits. Hashable: a static argument under `jax.jit`.

    Attributes:
      layers: (path, weight bits, activation bits) per quantized layer, sorted by path.
      attention: (path, bits) per quantized attention, sorted by path.
      weight_grid: shrink ratios of the weights' clipping search (1.0 only: min-max).
    """

    layers: tuple[LayerBits, ...]
    attention: tuple[tuple[str, int], ...] = ()
    weight_grid: Optional[tuple[float, ...]] = None

    def __post_init__(self):
        for path, wb, ab in self.layers:
            check_bits(wb), check_bits(ab)
        for path, b in self.attention:
            check_bits(b)

    @classmethod
    def build(
        cls,
        layers: Sequence[Layer],
        bits: Mapping[str, tuple[int, int]],
        *,
        attention_bits: Optional[Mapping[str, int]] = None,
        weight_grid: Optional[Sequence[float]] = None,
    ) -> "QuantSpec":
        """Checks `bits` {path: (weight bits, act bits)} against the model's `layers` and builds a spec.

        Raises:
          ValueError: a path that is not a layer of the model, or bits outside [2, 8], named.
        """
        known = {l.path for l in layers}
        unknown = sorted(set(bits) - known)
        if unknown:
            raise ValueError(f"unknown layer path(s) {unknown[:5]}; the model's layers are e.g. {sorted(known)[:5]}")
        entries = []
        for path in sorted(bits):
            pair = bits[path]
            if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
                raise ValueError(f"bits of {path!r} must be (weight bits, activation bits), got {pair!r}")
            weight_bits, act_bits = (check_bits(b, f"bits of {path!r} {pair!r}") for b in pair)
            entries.append((path, weight_bits, act_bits))
        attention = tuple(
            sorted((p, check_bits(b, f"attention bits of {p!r}")) for p, b in (attention_bits or {}).items())
        )
        return cls(
            layers=tuple(entries),
            attention=attention,
            weight_grid=tuple(weight_grid) if weight_grid is not None else None,
        )

    @property
    def bits(self) -> dict[str, tuple[int, int]]:
        """{path: (weight bits, activation bits)}."""
        return {p: (wb, ab) for p, wb, ab in self.layers}

    def site_bits(self) -> dict[str, int]:
        """Bits of every activation site: layer inputs and attention q / k / v."""
        sites = {p: ab for p, _, ab in self.layers}
        for path, b in self.attention:
            sites.update({f"{path}/q": b, f"{path}/k": b, f"{path}/v": b})
        return sites


def weight_grid(kernel: jax.Array, bits: int, out_axes: tuple[int, ...], grid=None) -> UniformParams:
    """A kernel's per-output-channel grid: the clipping that minimises ‖Q(W) − W‖² over `grid` (None: the
    default ratios), broadcastable against the kernel; no gradient flows into it."""
    kwargs = {} if grid is None else {"grid": grid}
    axes = weight_reduce_axes(kernel.ndim, out_axes)
    return search_clipping_params(jax.lax.stop_gradient(kernel), bits, reduce_axes=axes, **kwargs)


def quantize_weight(
    kernel: jax.Array,
    bits: int,
    out_axes: tuple[int, ...],
    *,
    grid=None,
    hessian: Optional[jax.Array] = None,
) -> tuple[jax.Array, UniformParams]:
    """(int32 codes of the kernel's shape, its per-output-channel grid) with clipping from a ‖Q(W) − W‖² search.

        w_hat = (codes − zero_point) · scale        (`uniform.dequantize`; scale and zero_point broadcast)

    With `hessian` [in, in] (XᵀX / n of the layer's inputs, `lampq_jax.apply.hessians`), the codes are
    chosen by GPTQ on that grid (`lampq_jax.quant.gptq`); the kernel must then be [*inputs, *outputs].
    Otherwise they round to nearest. Jitted with the levels 2^b − 1 traced: kernels of one shape (every block
    of a ViT) share one compilation at every bit-width, as a mixed-precision search needs.
    """
    levels = float(num_levels(bits))
    out_axes = tuple(int(a) for a in out_axes)
    if hessian is not None:
        n_in = kernel.ndim - len(out_axes)
        if out_axes != tuple(range(n_in, kernel.ndim)):
            raise ValueError(
                f"GPTQ needs a kernel [*inputs, *outputs]; got shape {kernel.shape} with out_axes {out_axes}"
            )
        rows = math.prod(kernel.shape[:n_in])
        if hessian.shape != (rows, rows):
            raise ValueError(
                f"hessian of shape {hessian.shape} does not fit a kernel {kernel.shape} with {rows} inputs"
            )
    grid = DEFAULT_CLIP_RATIOS if grid is None else tuple(grid)
    return _quantize_weight(kernel, jnp.float32(levels), hessian, out_axes=out_axes, grid=grid)


@functools.partial(jax.jit, static_argnames=("out_axes", "grid"))
def _quantize_weight(kernel, levels, hessian, *, out_axes, grid):
    """`quantize_weight` at traced `levels`."""
    x, _ = as_compute(jax.lax.stop_gradient(kernel))
    params = search_clipping_levels(x, levels, reduce_axes=weight_reduce_axes(kernel.ndim, out_axes), grid=grid)
    if hessian is not None:
        flat = x.reshape(-1, math.prod(kernel.shape[a] for a in out_axes))
        on_grid = gptq_round(flat, hessian, params.scale.reshape(-1), params.zero_point.reshape(-1), levels)
        # GPTQ returns (q − z)·s in float32: dividing by s recovers the integer q − z exactly.
        x = on_grid.reshape(kernel.shape).astype(x.dtype)
    return quantize_levels(x, params.scale.astype(x.dtype), params.zero_point.astype(x.dtype), levels), params


def quantize_kernel(
    kernel: jax.Array,
    bits: int,
    out_axes: tuple[int, ...],
    *,
    grid=None,
    ste: bool = False,
    hessian: Optional[jax.Array] = None,
) -> jax.Array:
    """The kernel fake-quantized per output channel: dequantize(`quantize_weight`), in the kernel's dtype.

    `ste` (straight-through gradients, for training) rounds to nearest on the same grid; GPTQ's rounding
    is not differentiable, so `hessian` with `ste` is an error.
    """
    if ste:
        if hessian is not None:
            raise ValueError("GPTQ weights (hessian given) have no straight-through gradient; use RTN for training")
        return fake_quant_ste(kernel, weight_grid(kernel, bits, out_axes, grid), bits)
    codes, params = quantize_weight(kernel, bits, out_axes, grid=grid, hessian=hessian)
    return dequantize(codes, params).astype(kernel.dtype)


def quantize_weights(
    variables: Any,
    layers: Sequence[Layer],
    spec: "QuantSpec",
    *,
    hessians: Optional[Mapping[str, jax.Array]] = None,
) -> dict[str, QuantizedTensor]:
    """{path: QuantizedTensor} of every layer in `spec`: its codes and grid at its weight bits (packed).

    Layers with an entry in `hessians` {path: [in, in]} get GPTQ codes, the others round to nearest.
    """
    out_axes = {l.path: tuple(l.out_axes) for l in layers}
    hessians = hessians or {}
    kernels = layer_kernels(variables, [path for path, _, _ in spec.layers])
    return {
        path: quantize_layer(kernels[path], wb, out_axes[path], grid=spec.weight_grid, hessian=hessians.get(path))
        for path, wb, _ in spec.layers
    }


def quantize_layer(
    kernel: jax.Array,
    bits: int,
    out_axes: tuple[int, ...],
    *,
    grid=None,
    hessian: Optional[jax.Array] = None,
) -> QuantizedTensor:
    """One kernel's `quantize_weight` codes and grid, packed (`QuantizedTensor.from_kernel`); its `kernel(out_axes)`
    equals `quantize_kernel(kernel, bits, out_axes, grid=grid, hessian=hessian)`."""
    codes, params = quantize_weight(kernel, bits, out_axes, grid=grid, hessian=hessian)
    return QuantizedTensor.from_kernel(codes, params, bits, out_axes, dtype=kernel.dtype)


def with_weights(variables: Any, layers: Sequence[Layer], tensors: Mapping[str, QuantizedTensor]) -> Any:
    """`variables` with the kernel of every layer in `tensors` {path: QuantizedTensor} replaced by its
    dequantized values, in the layer's own layout and dtype (`QuantizedTensor.kernel`)."""
    out_axes = {l.path: tuple(l.out_axes) for l in layers}
    return with_kernels(variables, {path: tensor.kernel(out_axes[path]) for path, tensor in tensors.items()})


def layer_kernels(variables: Any, paths: Sequence[str]) -> dict[str, jax.Array]:
    """{path: kernel} of the layers at `paths`; a path without 'params/<path>/kernel' is an error naming it."""
    flat = flatten_dict(dict(variables)["params"], sep="/")
    missing = [p for p in paths if f"{p}/kernel" not in flat]
    if missing:
        raise ValueError(
            f"layer path(s) {missing[:5]} have no kernel in the variables (looked for 'params/<path>/kernel')"
        )
    return {p: flat[f"{p}/kernel"] for p in paths}


def with_kernels(variables: Any, kernels: Mapping[str, jax.Array]) -> Any:
    """`variables` with the kernels of `kernels` {path: kernel} replaced (everything else unchanged)."""
    flat = flatten_dict(dict(variables)["params"], sep="/")
    flat.update({f"{p}/kernel": k for p, k in kernels.items()})
    return {**dict(variables), "params": unflatten_dict(flat, sep="/")}


def fake_quantize_params(
    variables: Any,
    layers: Sequence[Layer],
    spec: QuantSpec,
    *,
    ste: bool = False,
    hessians: Optional[Mapping[str, jax.Array]] = None,
) -> Any:
    """`variables` with every kernel in `spec` fake-quantized at its weight bits (others unchanged).

    Layers with an entry in `hessians` {path: [in, in]} get GPTQ codes, the others round to nearest.
    Works under `jax.jit` and `jax.grad` (with `ste`).
    """
    out_axes = {l.path: l.out_axes for l in layers}
    hessians = hessians or {}
    kernels = layer_kernels(variables, [path for path, _, _ in spec.layers])
    quantized = {
        path: quantize_kernel(
            kernels[path], wb, tuple(out_axes[path]), grid=spec.weight_grid, ste=ste, hessian=hessians.get(path)
        )
        for path, wb, _ in spec.layers
    }
    return with_kernels(variables, quantized)


def _params_at(table: jax.Array, bits: int) -> UniformParams:
    return UniformParams(scale=table[bits, 0], zero_point=table[bits, 1])


def activation_interceptor(spec: QuantSpec, act_params: ActivationParams, *, ste: bool = False):
    """Interceptor that fake-quantizes the input of each layer of `spec` and its attentions' q, k, v, softmax."""
    site_bits = spec.site_bits()
    missing = sorted(s for s in site_bits if s not in act_params)
    if missing:
        raise ValueError(f"no calibrated activation range for site(s) {missing[:5]}; calibrate them first")
    uniform = fake_quant_ste if ste else fake_quant
    attention_bits = dict(spec.attention)

    def on_site(site: str, x: jax.Array) -> jax.Array:
        bits = site_bits.get(site)
        if bits is None:
            return x
        return uniform(x, _params_at(jnp.asarray(act_params[site]), bits), bits)

    def on_softmax(path: str, weights: jax.Array) -> jax.Array:
        return softmax_dynamic(weights, jnp.int32(attention_bits[path]), ste=ste)

    return site_interceptor(
        on_site,
        layer_paths=frozenset(p for p, _, _ in spec.layers),
        attention_paths=frozenset(attention_bits),
        on_softmax=on_softmax,
    )


class QuantPoint(NamedTuple):
    """A quantized operating point: the spec, its activation quantizers, and fake-quantized variables."""

    spec: QuantSpec
    act_params: ActivationParams
    variables: Any


def quant_point(
    variables: Any,
    layers: Sequence[Layer],
    spec: QuantSpec,
    act_params: ActivationParams,
    *,
    hessians: Optional[Mapping[str, jax.Array]] = None,
) -> QuantPoint:
    """Fake-quantizes the kernels of `spec` once and bundles the point for Fisher / error passes."""
    return QuantPoint(spec, act_params, fake_quantize_params(variables, layers, spec, hessians=hessians))


def quantized_apply(
    model: nn.Module, layers: Sequence[Layer], spec: QuantSpec, act_params: ActivationParams, *, ste: bool = True
) -> Callable[..., Any]:
    """`fn(variables, *args, **kwargs)`: the model with weights and activations fake-quantized inside.

    Differentiable with straight-through gradients when `ste` (for training code); works under
    `jax.jit`, `jax.vmap` and `jax.grad`. Weights are quantized on every call; for inference use
    `fake_quantize_params` once and `activation_interceptor`.
    """

    def fn(variables, *args, **kwargs):
        qvars = fake_quantize_params(variables, layers, spec, ste=ste)
        with nn.intercept_methods(activation_interceptor(spec, act_params, ste=ste)):
            return model.apply(qvars, *args, **kwargs)

    return fn
