"""Log-√2 quantizer for post-softmax values (RepQ-ViT).

Attention probabilities in [0, s] crowd near 0 with a few large values; a logarithmic grid of
base √2 fits them better than a uniform one. With b bits:

    k  = round(-2 · log2(x / s))                    (the exponent in powers of √2)
    q  = clip(k, 0, 2^b - 1)
    x̂ = s · 2^(-q / 2) = s · (√2)^(-q)              if k <= 2^b - 1,  else 0

So the levels are s, s/√2, s/2, ..., s · 2^(-(2^b - 1)/2), plus 0 for values below the
smallest level's rounding threshold (and for x <= 0). Values above s map to s. Rounding
happens in the log domain: the threshold between two levels is their geometric mean.

Levels are built as s · ldexp(c, -⌊q/2⌋) with c = 1 for even q and c = fl(√½) for odd q, so a
level is the float32 rounding of s · 2^(-q/2) (for s a power of two, exactly that number) and
the quantizer is exact on these values. Levels below float32's smallest normal number
(codes >= 253 at 8 bits with s = 1) are flushed to 0 by XLA on CPU.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from lampq_jax.quant.uniform import as_compute, num_levels

_SQRT_HALF = math.sqrt(0.5)


def _check_scale(scale: jax.typing.ArrayLike) -> None:
    if isinstance(scale, (int, float)) and not scale > 0:
        raise ValueError(f"scale must be > 0, got {scale!r}")


def _sqrt2_power(q: jax.Array) -> jax.Array:
    """2^(-q / 2) for integer-valued float q >= 0, as ldexp(1 or fl(√½), -⌊q/2⌋)."""
    half = jnp.floor(q / 2.0)
    mantissa = jnp.where(q - 2.0 * half > 0.5, jnp.asarray(_SQRT_HALF, q.dtype), jnp.ones((), q.dtype))
    return jnp.ldexp(mantissa, -half.astype(jnp.int32))


def _log_sqrt2(x: jax.Array, scale: jax.Array, levels: float) -> jax.Array:
    """x̂ of the log-√2 quantizer, x and scale in a compute dtype."""
    ratio = x / scale
    positive = ratio > 0
    exponent = jnp.round(-2.0 * jnp.log2(jnp.where(positive, ratio, 1.0)))
    underflow = ~positive | (exponent > levels)
    q = jnp.clip(exponent, 0.0, levels)
    return jnp.where(underflow, 0.0, scale * _sqrt2_power(q))


def fake_quant_log_sqrt2(
    x: jax.typing.ArrayLike, bits: int, *, scale: jax.typing.ArrayLike = 1.0, ste: bool = False
) -> jax.Array:
    """Log-√2 fake quantization (RepQ-ViT) of values in [0, s].

        q = clip(round(-2 · log2(x / s)), 0, 2^b - 1),   x̂ = s · 2^(-q / 2)

    and x̂ = 0 where round(-2 · log2(x / s)) > 2^b - 1 or x <= 0. With `ste`, the gradient is
    straight-through:

        ∂x̂/∂x = 1  if  s · 2^(-(2^b - 1)/2) <= x <= s  (and x > 0),   else 0

    i.e. identity between the smallest nonzero level and the top level; `scale` receives none.

    Args:
        x: post-softmax values, [...] floating point, expected in [0, s].
        bits: bit-width b in [2, 8], static.
        scale: the top level s > 0 (1 for softmax); a float or an array broadcastable
            against `x` (say one per head).
        ste: the straight-through gradient above (default: the gradient of the rounding, 0 a.e.).

    Returns:
        x̂ with the shape and dtype of `x`.

    Raises:
        ValueError: if `bits` is invalid or a Python `scale` is not positive.
    """
    levels = float(num_levels(bits))
    _check_scale(scale)
    x32, dtype = as_compute(x)
    return _fake_quant_log_sqrt2(x32, jnp.asarray(scale, x32.dtype), levels=levels, dtype=dtype, ste=ste)


def fake_quant_log_sqrt2_ste(x: jax.typing.ArrayLike, bits: int, *, scale: jax.typing.ArrayLike = 1.0) -> jax.Array:
    """`fake_quant_log_sqrt2(x, bits, scale=scale, ste=True)`."""
    return fake_quant_log_sqrt2(x, bits, scale=scale, ste=True)


@functools.partial(jax.jit, static_argnames=("levels", "dtype", "ste"))
def _fake_quant_log_sqrt2(x32: jax.Array, scale: jax.Array, *, levels: float, dtype: jnp.dtype, ste: bool) -> jax.Array:
    if not ste:
        return _log_sqrt2(x32, scale, levels).astype(dtype)
    s = jax.lax.stop_gradient(scale)
    frozen = jax.lax.stop_gradient(x32)
    x_hat = _log_sqrt2(frozen, s, levels)
    smallest = s * _sqrt2_power(jnp.asarray(levels, x32.dtype))
    inside = (frozen > 0) & (frozen >= smallest) & (frozen <= s)
    return (x_hat + jnp.where(inside, x32 - frozen, 0.0)).astype(dtype)
