"""Clipping search for uniform quantizers, and quantization errors over candidate bit-widths.

The min-max range of a slice wastes levels on its few largest values. The search shrinks the
range [m, M] to [r · m, r · M] for each ratio r of a grid, and keeps, per slice, the ratio with
the smallest squared error ‖Q(x) - x‖² over that slice. Ratio 1 (no clipping) is always a
candidate, so the search never does worse than `minmax_params`.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp

from lampq_jax.quant.uniform import (
    Axes,
    UniformParams,
    as_compute,
    fake_quant_levels,
    normalize_axes,
    range_params,
    check_bits,
    num_levels,
)

# 1.00, 0.98, ..., 0.30: 36 shrink ratios of the min-max range. At 2-3 bits the best ratio for
# Laplace- or Student-t-like weights often lies below 0.5, hence the floor of 0.3.
DEFAULT_CLIP_RATIOS: tuple[float, ...] = tuple(round(1.0 - 0.02 * i, 2) for i in range(36))

# Most elements held at once by the search (grid points evaluated together × tensor size).
_SEARCH_ELEMENTS = 1 << 24


def _check_ratios(grid: Sequence[float]) -> tuple[float, ...]:
    """The grid plus 1.0, without repeats, in descending order (ties go to less clipping).

    Raises:
        ValueError: naming the values if the grid is empty or holds a ratio outside (0, 1].
    """
    try:
        ratios = tuple(float(r) for r in grid)
    except (TypeError, jax.errors.ConcretizationTypeError):
        raise ValueError(f"grid must be a static sequence of floats in (0, 1], got {grid!r}") from None
    bad = [r for r in ratios if not 0.0 < r <= 1.0]
    if not ratios or bad:
        raise ValueError(f"grid must hold ratios in (0, 1], got {ratios!r} (bad: {bad!r})")
    return tuple(sorted(set(ratios) | {1.0}, reverse=True))


def _search_levels(
    x: jax.Array, axes: tuple[int, ...], levels: jax.typing.ArrayLike, ratios: tuple[float, ...], copies: int
) -> UniformParams:
    """Clipping search on a compute-dtype `x`; `levels` may be traced, `copies` is how many
    searches run side by side (vmapped), to bound memory."""
    lo = jnp.minimum(jnp.min(x, axis=axes, keepdims=True), 0.0)
    hi = jnp.maximum(jnp.max(x, axis=axes, keepdims=True), 0.0)
    grid = jnp.asarray(ratios, x.dtype)

    def slice_errors(r: jax.Array) -> jax.Array:
        params = range_params(r * lo, r * hi, levels)
        diff = fake_quant_levels(x, params.scale, params.zero_point, levels) - x
        return jnp.sum(diff * diff, axis=axes, keepdims=True)

    batch = max(1, _SEARCH_ELEMENTS // max(1, x.size * copies))
    if batch >= len(ratios):
        errors = jax.vmap(slice_errors)(grid)
    else:
        errors = jax.lax.map(slice_errors, grid, batch_size=batch)
    best = grid[jnp.argmin(errors, axis=0)]  # [*params shape]; first minimum = least clipping
    return range_params(best * lo, best * hi, levels)


def search_clipping_params(
    x: jax.typing.ArrayLike,
    bits: int,
    *,
    reduce_axes: Axes = None,
    grid: Sequence[float] = DEFAULT_CLIP_RATIOS,
) -> UniformParams:
    """Uniform parameters whose clipping range minimizes the squared error of each slice.

    For each slice (the elements sharing one set of params, i.e. reduced over `reduce_axes`)
    with m = min(min x, 0), M = max(max x, 0):

        r* = argmin_{r ∈ grid ∪ {1}} ‖Q_{r}(x) - x‖²,   Q_r uniform on [r · m, r · M] with 2^b levels

    and returns the params of Q_{r*}. All ratios are evaluated together (vmapped, in chunks
    for large tensors); ties go to the larger ratio.

    Args:
        x: tensor to quantize, [...] floating point.
        bits: bit-width b in [2, 8], static.
        reduce_axes: axes that share params. None: per tensor; per output channel of a
            kernel: `weight_reduce_axes(kernel.ndim, out_axes)`.
        grid: shrink ratios in (0, 1], static. Default: 1.00, 0.98, ..., 0.30.

    Returns:
        `UniformParams` keeping x's rank (reduced axes of size 1).

    Raises:
        ValueError: if `bits`, `reduce_axes` or `grid` is invalid.

    Example:
        >>> w = jax.random.t(jax.random.key(0), 3.0, (768, 3072))
        >>> p = search_clipping_params(w, 4, reduce_axes=(0,))   # per output channel
        >>> w_hat = fake_quant(w, p, 4)
    """
    levels = num_levels(bits)
    ratios = _check_ratios(grid)
    x, _ = as_compute(x)
    axes = normalize_axes(x.ndim, reduce_axes, "reduce_axes")
    return _search_clipping_params(x, axes=axes, levels=float(levels), ratios=ratios)


def search_clipping_levels(
    x: jax.Array, levels: jax.typing.ArrayLike, *, reduce_axes: Axes, grid: Sequence[float] = DEFAULT_CLIP_RATIOS
) -> UniformParams:
    """`search_clipping_params` with `levels` = 2^b − 1 in place of the bits, so that it may be traced: one
    compilation of a caller's jitted function then serves every bit-width. `x` in its compute dtype (`as_compute`).
    """
    axes = normalize_axes(x.ndim, reduce_axes, "reduce_axes")
    return _search_levels(x, axes, levels, _check_ratios(grid), copies=1)


@functools.partial(jax.jit, static_argnames=("axes", "levels", "ratios"))
def _search_clipping_params(
    x: jax.Array, *, axes: tuple[int, ...], levels: float, ratios: tuple[float, ...]
) -> UniformParams:
    return _search_levels(x, axes, levels, ratios, copies=1)


def quant_errors(
    x: jax.typing.ArrayLike,
    bits_list: Sequence[int],
    *,
    reduce_axes: Axes = None,
    search: bool = True,
    grid: Sequence[float] = DEFAULT_CLIP_RATIOS,
) -> jax.Array:
    """Squared quantization error of `x` at each candidate bit-width, in one call.

        e_b = ‖Q_b(x) - x‖² = Σ (fake_quant(x, p_b, b) - x)²,   b ∈ bits_list

    with p_b from `search_clipping_params` (or `minmax_params` when `search=False`). The
    bit-widths are vmapped over (the number of levels 2^b - 1 is the only thing that varies).

    Args:
        x: tensor, [...] floating point.
        bits_list: candidate bit-widths, each in [2, 8], static; at least one.
        reduce_axes: axes that share params (None: per tensor).
        search: clipping search (True) or plain min-max range (False).
        grid: shrink ratios for the search, static.

    Returns:
        [len(bits_list)] errors (float32, or x's dtype if wider), in the order of `bits_list`.

    Raises:
        ValueError: if `bits_list` is empty or holds an invalid bit-width, or `reduce_axes` or
            `grid` is invalid.
    """
    bits_tuple = tuple(check_bits(b) for b in bits_list)
    if not bits_tuple:
        raise ValueError(f"bits_list must hold at least one bit-width, got {bits_list!r}")
    ratios = _check_ratios(grid) if search else (1.0,)
    x32, dtype = as_compute(x)
    axes = normalize_axes(x32.ndim, reduce_axes, "reduce_axes")
    levels = tuple(float(num_levels(b)) for b in bits_tuple)
    return _quant_errors(x32, axes=axes, levels=levels, ratios=ratios, search=search, dtype=dtype)


@functools.partial(jax.jit, static_argnames=("axes", "levels", "ratios", "search", "dtype"))
def _quant_errors(
    x32: jax.Array,
    *,
    axes: tuple[int, ...],
    levels: tuple[float, ...],
    ratios: tuple[float, ...],
    search: bool,
    dtype: jnp.dtype,
) -> jax.Array:
    def error(level: jax.Array) -> jax.Array:
        if search:
            params = _search_levels(x32, axes, level, ratios, copies=len(levels))
        else:
            lo = jnp.min(x32, axis=axes, keepdims=True)
            hi = jnp.max(x32, axis=axes, keepdims=True)
            params = range_params(lo, hi, level)
        # Through x's dtype, as `fake_quant` returns it.
        x_hat = fake_quant_levels(x32, params.scale, params.zero_point, level).astype(dtype)
        diff = x_hat.astype(x32.dtype) - x32
        return jnp.sum(diff * diff)

    return jax.vmap(error)(jnp.asarray(levels, x32.dtype))
