"""Asymmetric uniform quantization: ranges, integer codes, fake quantization and its STE.

A b-bit asymmetric uniform quantizer with step `scale` s > 0 and integer `zero_point` z maps

    q = clip(round(x / s) + z, 0, 2^b - 1)        (integer code)
    x̂ = (q - z) · s                               (dequantized value)

so it represents the grid {(q - z) · s : q = 0 .. 2^b - 1}, whose range
[-z · s, (2^b - 1 - z) · s] always contains 0, and 0 is represented exactly.

Every function here computes in float32 (or wider, if `x` is wider) and returns floats in the
dtype of `x`. Bit-widths are Python ints, static under `jax.jit`.
"""

from __future__ import annotations

import functools
import numbers
from typing import NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp

MIN_BITS = 2
MAX_BITS = 8

# Smallest step a range may have; a slice whose range is smaller (all zeros) gets this step,
# which still maps 0 to the code z and back to 0 exactly.
MIN_SCALE = 1e-12

Axes = Optional[Union[int, Sequence[int]]]


class UniformParams(NamedTuple):
    """Parameters of an asymmetric uniform quantizer.

    Attributes:
        scale: step s > 0, broadcastable against the quantized tensor (per tensor: every
            dimension 1; per channel: the channel dimensions kept, the others 1).
        zero_point: integer z in [0, 2^b - 1] stored as a float, same shape as `scale`.
    """

    scale: jax.Array
    zero_point: jax.Array


def check_bits(bits: int, what: str = "bits") -> int:
    """Returns `bits` as an int after checking it is an integer in [MIN_BITS, MAX_BITS].

    The library's one check of a bit-width; every option and spec that holds bits goes through it.

    Args:
        bits: bit-width; a Python (or NumPy) integer, static under `jax.jit`.
        what: how the message names the value, e.g. "fixed_bits" or "bits of 'encoderblock_0/fc1'".

    Returns:
        `int(bits)`.

    Raises:
        ValueError: if `bits` is not an integer (a float, a bool, a traced value) or lies
            outside [2, 8]; the message names the value.
    """
    if isinstance(bits, bool) or not isinstance(bits, numbers.Integral):
        raise ValueError(
            f"{what} must be an integer in [{MIN_BITS}, {MAX_BITS}] (a static Python int under "
            f"jax.jit), got {bits!r} of type {type(bits).__name__}"
        )
    if not MIN_BITS <= int(bits) <= MAX_BITS:
        raise ValueError(f"{what} must be an integer in [{MIN_BITS}, {MAX_BITS}], got {int(bits)}")
    return int(bits)


def num_levels(bits: int) -> int:
    """Largest code of a b-bit quantizer, 2^b - 1 (the number of steps of its grid)."""
    return 2 ** check_bits(bits) - 1


def normalize_axes(ndim: int, axes: Axes, name: str) -> tuple[int, ...]:
    """Axes as sorted non-negative ints; None means every axis.

    Raises:
        ValueError: naming `name`, the axes and `ndim` if an axis is out of range or repeated.
    """
    if axes is None:
        return tuple(range(ndim))
    if isinstance(axes, numbers.Integral) and not isinstance(axes, bool):
        axes = (axes,)
    try:
        raw = tuple(axes)
    except TypeError:
        raise ValueError(f"{name} must be None, an int or a sequence of ints, got {axes!r}") from None
    if any(isinstance(a, bool) or not isinstance(a, numbers.Integral) for a in raw):
        raise ValueError(f"{name} must hold ints, got {raw!r}")
    bad = [a for a in raw if not -ndim <= a < ndim]
    if bad:
        raise ValueError(f"{name}={raw!r} has axes {bad} out of range for ndim={ndim}")
    normal = tuple(int(a) % ndim for a in raw)
    if len(set(normal)) != len(normal):
        raise ValueError(f"{name}={raw!r} repeats an axis (as non-negative axes: {normal}) for ndim={ndim}")
    return tuple(sorted(normal))


def as_compute(x: jax.typing.ArrayLike) -> tuple[jax.Array, jnp.dtype]:
    """Returns (x in the compute dtype, x's own dtype); compute dtype is float32 or wider.

    Raises:
        TypeError: if `x` is not a floating-point array.
    """
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"x must be a floating-point array, got dtype {x.dtype}")
    compute = jnp.promote_types(x.dtype, jnp.float32)
    return x.astype(compute), x.dtype


def range_params(lo: jax.Array, hi: jax.Array, levels: jax.typing.ArrayLike) -> UniformParams:
    """Asymmetric parameters covering [min(lo, 0), max(hi, 0)] with `levels` steps.

        s = max((hi - lo) / levels, MIN_SCALE),   z = clip(round(-lo / s), 0, levels)

    `levels` may be traced (it is vmapped over in `quant_errors`).
    """
    lo = jnp.minimum(lo, 0.0)
    hi = jnp.maximum(hi, 0.0)
    scale = jnp.maximum((hi - lo) / levels, MIN_SCALE)
    zero_point = jnp.clip(jnp.round(-lo / scale), 0.0, levels)
    return UniformParams(scale=scale, zero_point=zero_point)


def fake_quant_levels(x: jax.Array, scale: jax.Array, zero_point: jax.Array, levels: jax.typing.ArrayLike) -> jax.Array:
    """(clip(round(x / s) + z, 0, levels) - z) · s, in the dtype of `x` (a compute dtype)."""
    codes = jnp.clip(jnp.round(x / scale) + zero_point, 0.0, levels)
    return (codes - zero_point) * scale


def _params_as(params: UniformParams, dtype: jnp.dtype) -> tuple[jax.Array, jax.Array]:
    return jnp.asarray(params.scale, dtype), jnp.asarray(params.zero_point, dtype)


def minmax_params(x: jax.typing.ArrayLike, bits: int, *, reduce_axes: Axes = None) -> UniformParams:
    """Asymmetric uniform parameters from the min and max of each slice.

    With m = min(min x, 0) and M = max(max x, 0) over `reduce_axes`:

        s = (M - m) / (2^b - 1),   z = round(-m / s)

    (s is at least `MIN_SCALE`, so an all-zero slice gets a valid quantizer.)

    Args:
        x: tensor to quantize, [...] any shape, floating point.
        bits: bit-width b in [2, 8], static.
        reduce_axes: axes the statistics are taken over. None: all (per tensor). For per
            output channel weights, every axis but the output ones (see `weight_reduce_axes`).

    Returns:
        `UniformParams` whose arrays keep x's rank (reduced axes of size 1), so they broadcast
        against `x`; float32 (or x's dtype if wider).

    Raises:
        ValueError: if `bits` or `reduce_axes` is invalid.
    """
    levels = float(num_levels(bits))
    x, _ = as_compute(x)
    axes = normalize_axes(x.ndim, reduce_axes, "reduce_axes")
    return _minmax_params(x, axes=axes, levels=levels)


@functools.partial(jax.jit, static_argnames=("axes", "levels"))
def _minmax_params(x: jax.Array, *, axes: tuple[int, ...], levels: float) -> UniformParams:
    lo = jnp.min(x, axis=axes, keepdims=True)
    hi = jnp.max(x, axis=axes, keepdims=True)
    return range_params(lo, hi, levels)


def quantize(x: jax.typing.ArrayLike, params: UniformParams, bits: int) -> jax.Array:
    """Integer codes q = clip(round(x / s) + z, 0, 2^b - 1).

    Args:
        x: tensor, [...] floating point.
        params: `UniformParams` broadcastable against `x`.
        bits: bit-width b in [2, 8], static.

    Returns:
        int32 codes in [0, 2^b - 1], shape of `x` broadcast with the params.
    """
    levels = float(num_levels(bits))
    x, _ = as_compute(x)
    scale, zero_point = _params_as(params, x.dtype)
    return _quantize(x, scale, zero_point, levels=levels)


@functools.partial(jax.jit, static_argnames=("levels",))
def _quantize(x: jax.Array, scale: jax.Array, zero_point: jax.Array, *, levels: float) -> jax.Array:
    return quantize_levels(x, scale, zero_point, levels)


def quantize_levels(x: jax.Array, scale: jax.Array, zero_point: jax.Array, levels: jax.typing.ArrayLike) -> jax.Array:
    """int32 codes clip(round(x / s) + z, 0, levels) of a compute-dtype `x`; `levels` may be traced."""
    return jnp.clip(jnp.round(x / scale) + zero_point, 0.0, levels).astype(jnp.int32)


def dequantize(codes: jax.typing.ArrayLike, params: UniformParams) -> jax.Array:
    """Values x̂ = (q - z) · s of integer codes q.

    Args:
        codes: integer codes, [...].
        params: `UniformParams` broadcastable against `codes`.

    Returns:
        float array of the params' dtype (float32 for params from this module).
    """
    scale = jnp.asarray(params.scale)
    dtype = jnp.promote_types(scale.dtype, jnp.float32)
    scale, zero_point = _params_as(params, dtype)
    return (jnp.asarray(codes).astype(dtype) - zero_point) * scale


def fake_quant(x: jax.typing.ArrayLike, params: UniformParams, bits: int) -> jax.Array:
    """Quantize then dequantize: x̂ = (clip(round(x / s) + z, 0, 2^b - 1) - z) · s.

    Equals `dequantize(quantize(x, params, bits), params)` cast to x's dtype. Its gradient is
    zero almost everywhere (it is piecewise constant); use `fake_quant_ste` to train through it.

    Args:
        x: tensor, [...] floating point.
        params: `UniformParams` broadcastable against `x`.
        bits: bit-width b in [2, 8], static.

    Returns:
        x̂ with the shape and dtype of `x`.
    """
    levels = float(num_levels(bits))
    x32, dtype = as_compute(x)
    scale, zero_point = _params_as(params, x32.dtype)
    return _fake_quant(x32, scale, zero_point, levels=levels, dtype=dtype)


@functools.partial(jax.jit, static_argnames=("levels", "dtype"))
def _fake_quant(x: jax.Array, scale: jax.Array, zero_point: jax.Array, *, levels: float, dtype: jnp.dtype) -> jax.Array:
    return fake_quant_levels(x, scale, zero_point, levels).astype(dtype)


def fake_quant_ste(x: jax.typing.ArrayLike, params: UniformParams, bits: int) -> jax.Array:
    """`fake_quant` with a straight-through estimator (STE) for the gradient.

    Forward: x̂ as in `fake_quant`. Backward (clipped STE):

        ∂x̂/∂x = 1  if  -z · s <= x <= (2^b - 1 - z) · s,   else 0

    Built as stop_gradient(x̂) + 1[inside] · (x - stop_gradient(x)), so it also works under
    forward-mode differentiation. The params receive no gradient. Arguments and result as `fake_quant`'s.
    """
    levels = float(num_levels(bits))
    x32, dtype = as_compute(x)
    scale, zero_point = _params_as(params, x32.dtype)
    return _fake_quant_ste(x32, scale, zero_point, levels=levels, dtype=dtype)


@functools.partial(jax.jit, static_argnames=("levels", "dtype"))
def _fake_quant_ste(
    x32: jax.Array, scale: jax.Array, zero_point: jax.Array, *, levels: float, dtype: jnp.dtype
) -> jax.Array:
    scale = jax.lax.stop_gradient(scale)
    zero_point = jax.lax.stop_gradient(zero_point)
    frozen = jax.lax.stop_gradient(x32)
    x_hat = fake_quant_levels(frozen, scale, zero_point, levels)
    inside = (frozen >= -zero_point * scale) & (frozen <= (levels - zero_point) * scale)
    return (x_hat + jnp.where(inside, x32 - frozen, 0.0)).astype(dtype)


def weight_reduce_axes(kernel_ndim: int, out_axes: Sequence[int]) -> tuple[int, ...]:
    """Axes to reduce over for per-output-channel quantization of a kernel.

    Examples (Flax layouts):
        Dense           [in, out]              out_axes=(1,)   -> (0,)
        DenseGeneral q  [dim, heads, head_dim] out_axes=(1, 2) -> (0,)
        DenseGeneral o  [heads, head_dim, dim] out_axes=(2,)   -> (0, 1)
        Conv            [kh, kw, cin, cout]    out_axes=(3,)   -> (0, 1, 2)

    Args:
        kernel_ndim: rank of the kernel, >= 1.
        out_axes: the output-channel axes; negative axes count from the end. At least one.

    Returns:
        The other axes, sorted ascending.

    Raises:
        ValueError: naming the values if `kernel_ndim` is not a positive int, or `out_axes` is
            empty, out of range or repeats an axis.
    """
    if isinstance(kernel_ndim, bool) or not isinstance(kernel_ndim, numbers.Integral) or kernel_ndim < 1:
        raise ValueError(f"kernel_ndim must be a positive int, got {kernel_ndim!r}")
    out = normalize_axes(int(kernel_ndim), out_axes, "out_axes")
    if not out:
        raise ValueError(
            f"out_axes must name at least one axis, got {out_axes!r}; for per-tensor quantization "
            "pass reduce_axes=None instead"
        )
    return tuple(a for a in range(int(kernel_ndim)) if a not in out)
