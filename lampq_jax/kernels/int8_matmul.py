"""W8A8 matmul: int8 activation codes times int8 weight codes, int32 accumulation, as Pallas.

Symmetric int8 on both sides (no zero points), per-row activation scale and per-column weight
scale::

    x ~ x_codes * x_scale        x_codes: int8 [M, K],  x_scale: float32 [M, 1]
    W ~ w_codes * w_scale        w_codes: int8 [K, N],  w_scale: float32 [1, N]
    out[m, n] = (sum_k x_codes[m, k] * w_codes[k, n]) * x_scale[m] * w_scale[n]     (float32)

The sum is exact in int32 (|code| <= 127, so K up to 2**17 can't overflow), and the scaling is
the same two float32 products as in ``int8_matmul_reference``, so kernel and reference agree to
rounding of those products. ``quantize_int8_symmetric`` makes the codes and scales
(``scale = max|a| / 127`` over the reduced axis, codes in ``[-127, 127]``).

Tiling is that of ``tiling.py``: grid over output tiles, K looped inside the kernel. The wrapper
lays the activation out as ``[K / block_k, M, block_k]`` so each K chunk is a whole leading
index (a contiguous tile on every backend), and zero-pads M, K and N to the blocks (zero codes
add nothing; padded rows and columns are cut off).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from lampq_jax.kernels import tiling
from lampq_jax.quant.uniform import UniformParams, quantize
from lampq_jax.kernels.tiling import BlockSizes, canonical_backend, compiler_params, fit_block, fit_rows
from lampq_jax.kernels.tiling import resolve_block_sizes, resolve_interpret

_OUT_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))


def default_block_sizes(backend: str | None = None) -> BlockSizes:
    """Default ``BlockSizes`` for ``"tpu"``, ``"gpu"`` or ``"cpu"`` (default: JAX's backend)."""
    return tiling.default_block_sizes("int8", backend)


def int8_matmul_kernel(x_ref, w_ref, x_scale_ref, w_scale_ref, o_ref, *, num_k_blocks, block_k):
    """One ``[block_m, block_n]`` output tile.

    Refs (block shapes): ``x_ref int8 [num_k_blocks, block_m, block_k]``, ``w_ref int8
    [K, block_n]``, ``x_scale_ref f32 [block_m, 1]``, ``w_scale_ref f32 [1, block_n]``,
    ``o_ref [block_m, block_n]``.
    """
    block_m, block_n = o_ref.shape

    def body(kb, acc):
        start = pl.multiple_of(kb * block_k, block_k)
        xs = x_ref[kb]  # [block_m, block_k]
        ws = w_ref[pl.ds(start, block_k), :]  # [block_k, block_n]
        return acc + jnp.dot(xs, ws, preferred_element_type=jnp.int32)

    acc = lax.fori_loop(0, num_k_blocks, body, jnp.zeros((block_m, block_n), jnp.int32))
    out = acc.astype(jnp.float32) * x_scale_ref[...] * w_scale_ref[...]
    o_ref[...] = out.astype(o_ref.dtype)


def _check_inputs(x_codes, x_scale, w_codes, w_scale, out_dtype):
    if x_codes.ndim != 2 or w_codes.ndim != 2:
        raise ValueError(f"x_codes must be [M, K] and w_codes [K, N], got shapes {x_codes.shape} and {w_codes.shape}")
    for name, a in (("x_codes", x_codes), ("w_codes", w_codes)):
        if a.dtype != jnp.int8:
            raise ValueError(f"{name} must be int8, got dtype {a.dtype}")
    (m, k), (k2, n) = x_codes.shape, w_codes.shape
    if k != k2:
        raise ValueError(f"K of x_codes {x_codes.shape} and w_codes {w_codes.shape} differ: {k} != {k2}")
    if tuple(x_scale.shape) != (m, 1):
        raise ValueError(f"x_scale must have shape ({m}, 1), got {tuple(x_scale.shape)}")
    if tuple(w_scale.shape) != (1, n):
        raise ValueError(f"w_scale must have shape (1, {n}), got {tuple(w_scale.shape)}")
    for name, a in (("x_scale", x_scale), ("w_scale", w_scale)):
        if not jnp.issubdtype(a.dtype, jnp.floating):
            raise ValueError(f"{name} must be a float array, got dtype {a.dtype}")
    if jnp.dtype(out_dtype) not in _OUT_DTYPES:
        raise ValueError(f"out_dtype must be float32 or bfloat16, got {out_dtype}")


def int8_matmul(
    x_codes: jax.Array,
    x_scale: jax.Array,
    w_codes: jax.Array,
    w_scale: jax.Array,
    *,
    block_sizes: BlockSizes | None = None,
    out_dtype: jax.typing.DTypeLike = jnp.float32,
    interpret: bool | None = None,
    backend: str | None = None,
) -> jax.Array:
    """``(x_codes @ w_codes) * x_scale * w_scale`` with int32 accumulation, as a Pallas kernel.

    Args:
      x_codes: int8 ``[M, K]``; x_scale: float ``[M, 1]``.
      w_codes: int8 ``[K, N]``; w_scale: float ``[1, N]``.
      block_sizes: upper bounds on the tiles; default ``default_block_sizes()`` for the backend.
      out_dtype: float32 (default) or bfloat16.
      interpret: Pallas interpret mode; default True on CPU, else False.
      backend: ``"tpu"``, ``"gpu"`` or ``"cpu"`` for the defaults and the lowering (Triton on
        GPU, Mosaic on TPU); default JAX's backend.

    Returns:
      ``[M, N]`` of ``out_dtype``.

    Raises:
      ValueError: wrong ranks, dtypes or shapes (the message gives the values).
    """
    x_codes, x_scale = jnp.asarray(x_codes), jnp.asarray(x_scale)
    w_codes, w_scale = jnp.asarray(w_codes), jnp.asarray(w_scale)
    _check_inputs(x_codes, x_scale, w_codes, w_scale, out_dtype)
    backend = canonical_backend(backend)
    block_sizes = resolve_block_sizes("int8", block_sizes, backend)
    if x_codes.shape[0] == 0:
        return jnp.zeros((0, w_codes.shape[1]), out_dtype)
    return _int8_matmul(
        x_codes,
        x_scale.astype(jnp.float32),
        w_codes,
        w_scale.astype(jnp.float32),
        block_sizes=block_sizes,
        out_dtype=jnp.dtype(out_dtype),
        interpret=resolve_interpret(interpret),
        backend=backend,
    )


@functools.partial(jax.jit, static_argnames=("block_sizes", "out_dtype", "interpret", "backend"))
def _int8_matmul(x_codes, x_scale, w_codes, w_scale, *, block_sizes, out_dtype, interpret, backend):
    (m, k), n = x_codes.shape, w_codes.shape[1]
    bs = block_sizes
    # int8 tiles are (32, 128) on TPU and Triton's int8 dot wants >= 32 rows: floor M at 32.
    block_m, m_pad = fit_rows(m, bs.block_m, 32)
    block_n, n_pad = fit_block(n, bs.block_n, 128)
    block_k, k_pad = fit_block(k, bs.block_k, 128)
    num_k_blocks = k_pad // block_k

    x = jnp.pad(x_codes, ((0, m_pad - m), (0, k_pad - k)))
    x = x.reshape(m_pad, num_k_blocks, block_k).transpose(1, 0, 2)  # [kb, M, block_k]
    x_scale = jnp.pad(x_scale, ((0, m_pad - m), (0, 0)))
    w = w_codes
    if (k_pad, n_pad) != (k, n):
        w = jnp.pad(w_codes, ((0, k_pad - k), (0, n_pad - n)))
    w_scale = jnp.pad(w_scale, ((0, 0), (0, n_pad - n)))

    out = pl.pallas_call(
        functools.partial(int8_matmul_kernel, num_k_blocks=num_k_blocks, block_k=block_k),
        out_shape=jax.ShapeDtypeStruct((m_pad, n_pad), out_dtype),
        grid=(m_pad // block_m, n_pad // block_n),
        in_specs=[
            pl.BlockSpec((num_k_blocks, block_m, block_k), lambda i, j: (0, i, 0)),
            pl.BlockSpec((k_pad, block_n), lambda i, j: (0, j)),
            pl.BlockSpec((block_m, 1), lambda i, j: (i, 0)),
            pl.BlockSpec((1, block_n), lambda i, j: (0, j)),
        ],
        out_specs=pl.BlockSpec((block_m, block_n), lambda i, j: (i, j)),
        interpret=interpret,
        compiler_params=None if interpret else compiler_params(backend),
        name="int8_matmul",
    )(x, w, x_scale, w_scale)
    return out[:m, :n]


def int8_matmul_reference(
    x_codes: jax.Array,
    x_scale: jax.Array,
    w_codes: jax.Array,
    w_scale: jax.Array,
    *,
    out_dtype: jax.typing.DTypeLike = jnp.float32,
) -> jax.Array:
    """Pure-jnp ``(x_codes @ w_codes) * x_scale * w_scale``: int32 dot, float32 scaling."""
    x_codes, x_scale = jnp.asarray(x_codes), jnp.asarray(x_scale)
    w_codes, w_scale = jnp.asarray(w_codes), jnp.asarray(w_scale)
    _check_inputs(x_codes, x_scale, w_codes, w_scale, out_dtype)
    return _int8_matmul_reference(x_codes, x_scale, w_codes, w_scale, out_dtype=jnp.dtype(out_dtype))


@functools.partial(jax.jit, static_argnames=("out_dtype",))
def _int8_matmul_reference(x_codes, x_scale, w_codes, w_scale, *, out_dtype):
    acc = jnp.dot(x_codes.astype(jnp.int32), w_codes.astype(jnp.int32), preferred_element_type=jnp.int32)
    out = acc.astype(jnp.float32) * x_scale.astype(jnp.float32) * w_scale.astype(jnp.float32)
    return out.astype(out_dtype)


@functools.partial(jax.jit, static_argnames=("axis",))
def quantize_int8_symmetric(a: jax.typing.ArrayLike, axis: int) -> tuple[jax.Array, jax.Array]:
    """Symmetric int8 codes and scales, one scale per slice along ``axis`` (reduced, kept).

    ``scale = max|a| / 127`` over ``axis`` (1 where the slice is all zero),
    ``codes = clip(round(a / scale), -127, 127)``. For activations ``x [M, K]`` use ``axis=1``
    (scale ``[M, 1]``); for weights ``w [K, N]`` use ``axis=0`` (scale ``[1, N]``).

    That is the library's one uniform quantizer (`quant.uniform.quantize`) at 8 bits with the zero point
    127, shifted back by 127: |a / scale| ≤ 127, so its clip to [0, 255] never binds above 254.
    """
    a = jnp.asarray(a, jnp.float32)
    amax = jnp.max(jnp.abs(a), axis=axis, keepdims=True)
    scale = jnp.where(amax > 0, amax / 127.0, 1.0)
    codes = quantize(a, UniformParams(scale, jnp.full_like(scale, 127.0)), 8) - 127
    return codes.astype(jnp.int8), scale


__all__ = [
    "BlockSizes",
    "default_block_sizes",
    "int8_matmul",
    "int8_matmul_kernel",
    "int8_matmul_reference",
    "quantize_int8_symmetric",
]
