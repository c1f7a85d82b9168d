"""Weight-only low-bit matmul: ``x [M, K] @ W``, W packed 2-8-bit codes, as a Pallas kernel.

``W`` is a ``QuantizedTensor``: codes ``q [K, N]`` packed along K (see ``quant/packing.py``),
per-output-channel ``scale s [1, N]`` and ``zero_point z [1, N]``, ``W = (q - z) * s``. The
zero point is factored out of the product so the kernel multiplies by the raw codes::

    x @ ((q - z) * s) = (x @ q  -  rowsum(x) z) * s,      rowsum(x)[m] = sum_k x[m, k]

Each code is a sum of power-of-two fields, ``q = sum_f field_f << shift_f``, and each byte of a
field holds ``p_f`` values for consecutive k (``k = p_f * r + slot``). The wrapper permutes the
activation's columns once per call so that slot ``slot`` of packed row ``r`` meets
``x[:, p_f * r + slot]`` in a contiguous tile; the kernel then needs no interleaving::

    x @ q = sum_f sum_slot  x_f[slot] @ (((w_f >> (slot * bits_f)) & mask_f) << shift_f)

The kernel unpacks a ``[block_k / p_f, block_n]`` byte tile with a shift and a mask in int32,
converts the codes (at most 255, exact in bfloat16) to the activation dtype and calls
``jnp.dot(..., preferred_element_type=float32)``: int4 dots are not needed. Accumulation over
K is float32. 2-, 4- and 8-bit weights cost one matmul of FLOPs; 3-, 5- and 6-bit weights
(two fields) cost two, while reading only ``bits / 8`` bytes a weight, which is what bounds
decode-sized (small M) calls.

Padding: M is padded to the M block (the permuted activation is a new array anyway); N and K
are padded only when no power-of-two block (down to 128) divides them, which costs one copy of
the packed weight per call; ViT shapes (K, N multiples of 128) take the zero-copy path.

Status: verified in interpret mode on CPU against ``weight_only_matmul_reference``; from a CPU
host the kernel also lowers to Mosaic (TPU) and Triton (GPU) IR (see the tests). It has not yet
been compiled and timed on TPU/GPU hardware (``benchmarks/bench_kernels_gpu.py`` does that).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from lampq_jax.kernels import tiling
from lampq_jax.kernels.tiling import BlockSizes, canonical_backend, compiler_params, fit_block, fit_rows
from lampq_jax.kernels.tiling import resolve_block_sizes, resolve_interpret
from lampq_jax.quant import packing
from lampq_jax.quant.qtensor import QuantizedTensor

_ACTIVATION_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))


def default_block_sizes(backend: str | None = None) -> BlockSizes:
    """Default ``BlockSizes`` for ``"tpu"``, ``"gpu"`` or ``"cpu"`` (default: JAX's backend)."""
    return tiling.default_block_sizes("weight_only", backend)


def weight_only_matmul_kernel(*refs, fields, row_offsets, num_k_blocks, block_k, precision):
    """One ``[block_m, block_n]`` output tile; loops over K in chunks of ``block_k`` codes.

    Refs (block shapes):
      x_refs: one per field f, ``[p_f, num_k_blocks, block_m, block_k / p_f]``: the activation,
        columns permuted so ``x_f[slot, kb, :, r] = x[:, kb * block_k + p_f * r + slot]``.
      w_ref: ``uint8 [K_packed, block_n]``: all fields' sections (``row_offsets``).
      scale_ref, zero_ref: ``float32 [1, block_n]``.
      o_ref: ``[block_m, block_n]``.
    """
    *x_refs, w_ref, scale_ref, zero_ref, o_ref = refs
    block_m, block_n = o_ref.shape
    compute_dtype = x_refs[0].dtype

    def body(kb, carry):
        acc, rowsum = carry
        for i, (field, offset, x_ref) in enumerate(zip(fields, row_offsets, x_refs)):
            rows = block_k // field.per_byte
            start = pl.multiple_of(offset + kb * rows, rows)
            w = w_ref[pl.ds(start, rows), :].astype(jnp.int32)  # [rows, block_n]
            mask = 2**field.bits - 1
            for slot in range(field.per_byte):
                q = ((w >> (slot * field.bits)) & mask) << field.shift
                xs = x_ref[slot, kb]  # [block_m, rows]
                acc += jnp.dot(xs, q.astype(compute_dtype), preferred_element_type=jnp.float32, precision=precision)
                if i == 0:  # field 0 covers every k exactly once
                    rowsum += jnp.sum(xs.astype(jnp.float32), axis=1, keepdims=True)
        return acc, rowsum

    acc0 = jnp.zeros((block_m, block_n), jnp.float32)
    rowsum0 = jnp.zeros((block_m, 1), jnp.float32)
    acc, rowsum = lax.fori_loop(0, num_k_blocks, body, (acc0, rowsum0))
    out = (acc - rowsum * zero_ref[...]) * scale_ref[...]
    o_ref[...] = out.astype(o_ref.dtype)


def _check_inputs(x, qw, out_dtype):
    if not isinstance(qw, QuantizedTensor):
        raise TypeError(f"qw must be a QuantizedTensor, got {type(qw).__name__}")
    if x.ndim != 2:
        raise ValueError(f"x must be [M, K], got shape {x.shape}")
    if jnp.dtype(x.dtype) not in _ACTIVATION_DTYPES:
        raise ValueError(f"x must be float32 or bfloat16, got dtype {x.dtype}")
    if qw.bits not in packing.SUPPORTED_BITS:
        raise ValueError(f"qw.bits must be one of {packing.SUPPORTED_BITS}, got {qw.bits}")
    k, n = qw.matrix_shape
    if x.shape[1] != k:
        raise ValueError(
            f"x.shape[1] = {x.shape[1]} does not match the weight's K = {k} (x: {x.shape}, weight [K, N] = [{k}, {n}])"
        )
    if qw.packed.dtype != jnp.uint8:
        raise ValueError(f"qw.packed must be uint8, got dtype {qw.packed.dtype}")
    expected = (packing.packed_length(k, qw.bits), n)
    if tuple(qw.packed.shape) != expected:
        raise ValueError(
            f"qw.packed has shape {tuple(qw.packed.shape)}, expected {expected} for K={k}, N={n}, bits={qw.bits}"
        )
    for name in ("scale", "zero_point"):
        shape = tuple(getattr(qw, name).shape)
        if shape != (1, n):
            raise ValueError(f"qw.{name} must have shape (1, {n}), got {shape}")
    if out_dtype is not None and jnp.dtype(out_dtype) not in _ACTIVATION_DTYPES:
        raise ValueError(f"out_dtype must be float32 or bfloat16, got {out_dtype}")


def weight_only_matmul(
    x: jax.Array,
    qw: QuantizedTensor,
    *,
    block_sizes: BlockSizes | None = None,
    out_dtype: jax.typing.DTypeLike | None = None,
    interpret: bool | None = None,
    backend: str | None = None,
) -> jax.Array:
    """``x @ qw.dequantize()`` without dequantizing: the Pallas kernel unpacks the codes.

    Args:
      x: ``[M, K]`` float32 or bfloat16.
      qw: ``QuantizedTensor`` of a ``[K, N]`` weight, any of ``packing.SUPPORTED_BITS``.
      block_sizes: upper bounds on the tiles; default ``default_block_sizes()`` for the backend.
      out_dtype: float32 or bfloat16; default ``x.dtype``.
      interpret: run the kernel in Pallas interpret mode; default True on CPU, else False.
      backend: ``"tpu"``, ``"gpu"`` or ``"cpu"``: picks the default block sizes and the lowering
        (Triton on GPU, Mosaic on TPU); default JAX's backend. Set it to lower for another
        platform, e.g. with ``jax.export`` on a CPU host.

    Returns:
      ``[M, N]`` of ``out_dtype``.

    Raises:
      ValueError: shapes that don't fit together, unsupported dtypes or bit-widths (the message
        gives the values). TypeError: ``qw`` is not a ``QuantizedTensor``.
    """
    x = jnp.asarray(x)
    _check_inputs(x, qw, out_dtype)
    backend = canonical_backend(backend)
    block_sizes = resolve_block_sizes("weight_only", block_sizes, backend)
    out_dtype = jnp.dtype(x.dtype if out_dtype is None else out_dtype)
    if x.shape[0] == 0:
        return jnp.zeros((0, qw.matrix_shape[1]), out_dtype)
    return _weight_only_matmul(
        x,
        qw.packed,
        qw.scale,
        qw.zero_point,
        bits=qw.bits,
        k=qw.matrix_shape[0],
        block_sizes=block_sizes,
        out_dtype=out_dtype,
        interpret=resolve_interpret(interpret),
        backend=backend,
    )


def _repack_k(packed, bits, k, k_to):
    """Zero-pads each field's section of ``packed [K_packed, N]`` from ``k`` to ``k_to`` codes."""
    sections = []
    kp = packing.padded_length(k, bits)
    for field, offset in zip(packing.packed_fields(bits), packing.field_row_offsets(k, bits)):
        rows, rows_to = kp // field.per_byte, k_to // field.per_byte
        sections.append(jnp.pad(packed[offset : offset + rows], ((0, rows_to - rows), (0, 0))))
    return jnp.concatenate(sections, axis=0) if len(sections) > 1 else sections[0]


@functools.partial(jax.jit, static_argnames=("bits", "k", "block_sizes", "out_dtype", "interpret", "backend"))
def _weight_only_matmul(x, packed, scale, zero_point, *, bits, k, block_sizes, out_dtype, interpret, backend):
    m = x.shape[0]
    n = packed.shape[1]
    fields = packing.packed_fields(bits)
    bs = block_sizes
    block_m, m_pad = fit_rows(m, bs.block_m, 16)
    block_n, n_pad = fit_block(n, bs.block_n, 128)
    block_k, k_pad = fit_block(packing.padded_length(k, bits), bs.block_k, 128)
    num_k_blocks = k_pad // block_k

    if k_pad != packing.padded_length(k, bits):
        packed = _repack_k(packed, bits, k, k_pad)
    if n_pad != n:
        packed = jnp.pad(packed, ((0, 0), (0, n_pad - n)))
        scale = jnp.pad(scale, ((0, 0), (0, n_pad - n)), constant_values=1.0)
        zero_point = jnp.pad(zero_point, ((0, 0), (0, n_pad - n)))
    x = jnp.pad(x, ((0, m_pad - m), (0, k_pad - k)))

    x_fields, x_specs = [], []
    for field in fields:
        p, rows = field.per_byte, block_k // field.per_byte
        # x_f[slot, kb, m, r] = x[m, kb * block_k + p * r + slot]
        x_f = x.reshape(m_pad, num_k_blocks, rows, p).transpose(3, 1, 0, 2)
        x_fields.append(x_f)
        x_specs.append(pl.BlockSpec((p, num_k_blocks, block_m, rows), lambda i, j: (0, 0, i, 0)))

    kernel = functools.partial(
        weight_only_matmul_kernel,
        fields=fields,
        row_offsets=packing.field_row_offsets(k_pad, bits),
        num_k_blocks=num_k_blocks,
        block_k=block_k,
        precision=lax.Precision.HIGHEST if x.dtype == jnp.float32 else None,
    )
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((m_pad, n_pad), out_dtype),
        grid=(m_pad // block_m, n_pad // block_n),
        in_specs=x_specs
        + [
            pl.BlockSpec((packed.shape[0], block_n), lambda i, j: (0, j)),
            pl.BlockSpec((1, block_n), lambda i, j: (0, j)),
            pl.BlockSpec((1, block_n), lambda i, j: (0, j)),
        ],
        out_specs=pl.BlockSpec((block_m, block_n), lambda i, j: (i, j)),
        interpret=interpret,
        compiler_params=None if interpret else compiler_params(backend),
        name=f"weight_only_matmul_w{bits}",
    )(*x_fields, packed, scale, zero_point)
    return out[:m, :n]


def weight_only_matmul_reference(
    x: jax.Array,
    qw: QuantizedTensor,
    *,
    out_dtype: jax.typing.DTypeLike | None = None,
) -> jax.Array:
    """Pure-jnp ``x @ qw.dequantize()`` in float32 (``Precision.HIGHEST``), cast to ``out_dtype``."""
    x = jnp.asarray(x)
    _check_inputs(x, qw, out_dtype)
    return _reference(x, qw, out_dtype=jnp.dtype(x.dtype if out_dtype is None else out_dtype))


@functools.partial(jax.jit, static_argnames=("out_dtype",))
def _reference(x, qw, *, out_dtype):
    w = qw.dequantize(jnp.float32)
    out = jnp.dot(x.astype(jnp.float32), w, precision=lax.Precision.HIGHEST)
    return out.astype(out_dtype)


__all__ = [
    "BlockSizes",
    "default_block_sizes",
    "weight_only_matmul",
    "weight_only_matmul_kernel",
    "weight_only_matmul_reference",
]
