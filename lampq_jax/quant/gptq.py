"""GPTQ rounding of a weight matrix on a fixed per-output-channel grid. No Flax.

Round-to-nearest (RTN) quantizes each weight alone. GPTQ (Frantar et al., 2023) quantizes the input
rows of W [in, out] one after another and spreads each row's rounding error over the rows still to
come, so that the layer's *output* error on the calibration inputs stays small:

    minimize ‖X Ŵ − X W‖²  over Ŵ on the grid,   H = XᵀX / n (+ damping),   U = chol(H⁻¹)ᵀ (upper)
    for i = 0 .. in − 1:   ŵ_i = Q(w_i),   e_i = (w_i − ŵ_i) / U_ii,   w_j −= U_ij e_i  for j > i

The grid (scale, zero point per output channel) is chosen before, by the clipping search, so the
result is still asymmetric uniform per output channel and packs like an RTN weight. Rows go in
blocks of `block`: the error of a block reaches the later rows in one matmul (the "lazy batch"
form), which gives the same result as the row-by-row loop.

Measured on the real DINOv2-S/14 (32 calibration / 32 held-out crops, class-token cosine to float,
weights alone at b bits, activations in float): W4 0.910 (RTN) → 0.963, W3 0.694 → 0.841.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from lampq_jax.quant.uniform import fake_quant_levels

DEFAULT_DAMP = 0.01  # λ = DEFAULT_DAMP · mean(diag H) added to the diagonal
DEFAULT_BLOCK = 64


def damped_hessian(hessian: jax.Array, damp: float = DEFAULT_DAMP) -> jax.Array:
    """H + λI with λ = damp · mean(diag H); an input that is always 0 (diag 0) gets 1 on its diagonal."""
    diag = jnp.diag(hessian)
    dead = diag <= 0.0
    hessian = hessian + jnp.diag(jnp.where(dead, 1.0, 0.0))
    mean = jnp.mean(jnp.where(dead, 0.0, diag))
    return hessian + damp * jnp.where(mean > 0, mean, 1.0) * jnp.eye(hessian.shape[0], dtype=hessian.dtype)


@functools.partial(jax.jit, static_argnames=("block", "damp"))
def gptq_round(
    w: jax.Array,
    hessian: jax.Array,
    scale: jax.Array,
    zero_point: jax.Array,
    levels: jax.typing.ArrayLike,
    *,
    block: int = DEFAULT_BLOCK,
    damp: float = DEFAULT_DAMP,
) -> jax.Array:
    """GPTQ fake quantization of `w` on a fixed grid (module docstring).

    Args:
      w: [in, out] weights (input rows, output columns).
      hessian: [in, in] XᵀX / n of the layer's inputs X [n, in].
      scale, zero_point: [out] the grid of each output column.
      levels: 2^b − 1 (may be traced, to vmap over bit-widths).
      block: rows per lazy-batch block.
      damp: relative damping of H.

    Returns:
      [in, out] dequantized weights, every entry on its column's grid.
    """
    n, out = w.shape
    w = w.astype(jnp.float32)
    size = min(block, n)
    pad = (-n) % size
    # Padded rows: weight 0 (on the grid: 0 is always a level), inputs uncorrelated with the rest.
    w = jnp.pad(w, ((0, pad), (0, 0)))
    h = damped_hessian(hessian.astype(jnp.float32), damp)
    h = jnp.pad(h, ((0, pad), (0, pad))) + jnp.diag(jnp.concatenate([jnp.zeros(n), jnp.ones(pad)]))
    upper = jnp.linalg.cholesky(jnp.linalg.inv(h)).T
    total = n + pad
    scale, zero = scale.astype(jnp.float32), zero_point.astype(jnp.float32)
    levels = jnp.asarray(levels, jnp.float32)

    def one_block(b, carry):
        w, q = carry
        start = b * size
        rows = jax.lax.dynamic_slice(w, (start, 0), (size, out))
        u_block = jax.lax.dynamic_slice(upper, (start, start), (size, size))

        def one_row(j, inner):
            rows, q_rows, errors = inner
            row = rows[j]
            q_row = fake_quant_levels(row, scale, zero, levels)
            error = (row - q_row) / u_block[j, j]
            later = (jnp.arange(size) > j).astype(jnp.float32)
            rows = rows - (u_block[j] * later)[:, None] * error[None, :]
            return rows, q_rows.at[j].set(q_row), errors.at[j].set(error)

        zeros = jnp.zeros((size, out), jnp.float32)
        _, q_rows, errors = jax.lax.fori_loop(0, size, one_row, (rows, zeros, zeros))
        u_rows = jax.lax.dynamic_slice(upper, (start, 0), (size, total))  # [size, total]
        after = (jnp.arange(total) >= start + size).astype(jnp.float32)
        w = w - (u_rows * after[None, :]).T @ errors
        return w, jax.lax.dynamic_update_slice(q, q_rows, (start, 0))

    _, q = jax.lax.fori_loop(0, total // size, one_block, (w, jnp.zeros_like(w)))
    return q[:n]
