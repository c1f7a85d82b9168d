"""Quantizers whose bit-width is a traced value (one compilation for every assignment). No Flax.

    uniform:  x̂ = (clip(round(x / s) + z, 0, 2^b − 1) − z) · s,  (s, z) = table[b]   (s, z: [] or [channels])
    softmax:  log quantizer of base 2^(1/k) on (0, 1]: code = round(−k log2 w), ŵ = 2^(−code / k) if
              code ≤ L = 2^b − 1 else 0, with k = L / log2(SOFTMAX_FLOOR_FACTOR · n) for n keys

Bits 0 means "not quantized" (identity), so a whole model can run with any subset quantized.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lampq_jax.quant.uniform import fake_quant_levels

# The softmax quantizer's L + 1 levels 2^(−code/k) span [floor, 1] with floor = 1 / (F · n) for n keys:
# k = L / log2(F n). log√2 (RepQ-ViT, k = 2) fixes the base, so its floor 2^(−L/2) sits above a typical
# probability 1/n at 4 bits and 257 tokens (2^−7.5 ≈ 1/181), and its levels are √2 apart even at 8 bits;
# a uniform grid on [0, 1] rounds every probability below 1/(2L) to zero. This base adapts to both the
# bits and the tokens (AdaLog-like, without a search). F = 64 measured best of {16, 64, 256} on
# the real DINOv2-S/14 at W4A4 (class-token cosine 0.838 / 0.853 / 0.819, 16 held-out crops;
# bench_real_vit_parts, 2026-12-04; an earlier run with older defaults gave 0.789 / 0.790 / 0.786).
SOFTMAX_FLOOR_FACTOR = 64.0


def unless_zero_bits(bits: jax.Array, quantize, x: jax.Array) -> jax.Array:
    """`quantize(x)` where the traced `bits` > 0, else `x`: a `lax.cond`, so that a site left in float (a probe
    quantizes one layer of 72) does not pay for its quantizer."""
    return jax.lax.cond(bits > 0, quantize, lambda v: v, x)


def fake_quant_dynamic(x: jax.Array, table: jax.Array, bits: jax.Array, *, ste: bool = False) -> jax.Array:
    """Uniform fake quantization of `x` at traced `bits` with (scale, zero) = table[bits]; bits 0: identity.

    With `ste`, the gradient is 1 inside the representable range [(0 − z)s, (2^b − 1 − z)s] and 0 outside.
    """
    safe = jnp.maximum(bits, 2)
    scale, zero = table[safe, 0], table[safe, 1]
    levels = (2.0 ** safe.astype(jnp.float32)) - 1.0

    def quantize(x):
        q = fake_quant_levels(x, scale, zero, levels).astype(x.dtype)
        if ste:
            inside = (x >= (0.0 - zero) * scale) & (x <= (levels - zero) * scale)
            q = jnp.where(inside, x + jax.lax.stop_gradient(q - x), jax.lax.stop_gradient(q))
        return q

    return unless_zero_bits(bits, quantize, x)


def softmax_log_base(bits: jax.Array, num_keys: int) -> jax.Array:
    """k of the softmax quantizer's base 2^(1/k): k = (2^b − 1) / log2(SOFTMAX_FLOOR_FACTOR · num_keys)."""
    levels = (2.0 ** jnp.asarray(bits, jnp.float32)) - 1.0
    return levels / jnp.log2(SOFTMAX_FLOOR_FACTOR * max(int(num_keys), 2))


def softmax_dynamic(w: jax.Array, bits: jax.Array, *, ste: bool = False) -> jax.Array:
    """Fake quantization of softmax outputs w ∈ [0, 1] [..., keys] at traced `bits`; bits 0: identity.

        k = (2^b − 1) / log2(F · keys),  code = round(−k log2 w),  ŵ = 2^(−code / k) if code ≤ 2^b − 1 else 0

    With `ste`, the gradient is 1 on (0, 1], 0 elsewhere.
    """
    safe = jnp.maximum(bits, 2)
    levels = (2.0 ** safe.astype(jnp.float32)) - 1.0
    k = softmax_log_base(safe, w.shape[-1])

    def quantize(w):
        code = jnp.maximum(jnp.round(-k * jnp.log2(jnp.maximum(w, 1e-38))), 0.0)
        q = jnp.where((code <= levels) & (w > 0), 2.0 ** (-code / k), 0.0).astype(w.dtype)
        if ste:
            inside = (w > 0.0) & (w <= 1.0)
            q = jnp.where(inside, w + jax.lax.stop_gradient(q - w), jax.lax.stop_gradient(q))
        return q

    return unless_zero_bits(bits, quantize, w)
