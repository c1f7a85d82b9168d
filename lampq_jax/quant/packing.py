"""Packing of unsigned b-bit integer codes into bytes, along one axis.

Codes are unsigned integers in ``[0, 2**bits - 1]`` (asymmetric quantization stores the zero
point separately). They are packed along one axis, by default axis 0: the contracting (input)
axis K of a ``[K, N]`` weight, so a matmul kernel can read a K-block of packed rows and unpack
it in registers. Every other axis is left as it is.

Layout (``bits`` -> bytes):

* A code of ``bits`` bits is split into one or two *fields*, each of a power-of-two width,
  low bits first::

      bits:    8      4      2      3        5        6
      fields:  (8,)   (4,)   (2,)   (2, 1)   (4, 1)   (4, 2)

  For 3 bits the low 2 bits form field 0 and the top bit field 1; a code is
  ``q = field0 + (field1 << 2)``. Likewise 5 = 4 + 1 and 6 = 4 + 2.
* A field of ``fb`` bits holds ``p = 8 // fb`` values a byte. Byte ``r`` of a field holds the
  values of codes ``p*r, p*r + 1, ..., p*r + p - 1`` (the lowest index in the lowest bits):
  for 4 bits, code ``2r`` in the low nibble and code ``2r + 1`` in the high nibble; for 2 bits,
  code ``4r`` in bits 0-1, ..., code ``4r + 3`` in bits 6-7; for 8 bits one code a byte.
* The axis is first zero-padded to ``Kp``, a multiple of the *group* ``g = max p`` over the
  fields (8 -> 1, 4 -> 2, 2 -> 4, 3 -> 8, 5 -> 8, 6 -> 4). The packed axis is the fields'
  sections one after the other: field 0 (``Kp * fb0 / 8`` bytes), then field 1
  (``Kp * fb1 / 8`` bytes). Its length is ``packed_length(K, bits) = Kp * bits / 8``.

So every width is stored densely: exactly ``bits / 8`` bytes a code (plus fewer than ``g``
padding codes per packed vector), i.e. a storage ratio of ``bits / 32`` against float32.
Splitting 3-, 5- and 6-bit codes into power-of-two fields keeps every field byte-aligned:
a kernel unpacks a field with one shift and one mask, no value crosses a byte boundary, and
``x @ q = x @ field0 + 2**fb0 * (x @ field1)`` lets it use each field without reassembling
the codes.

Example:
  >>> codes = jnp.array([[1], [2], [3], [15]], jnp.int32)   # [K=4, N=1], 4 bits
  >>> pack_codes(codes, 4)                                  # [[0x21], [0xF3]]
  >>> unpack_codes(pack_codes(codes, 4), 4, length=4)       # == codes
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

SUPPORTED_BITS: tuple[int, ...] = (2, 3, 4, 5, 6, 8)

_FIELD_BITS: dict[int, tuple[int, ...]] = {
    8: (8,),
    4: (4,),
    2: (2,),
    3: (2, 1),
    5: (4, 1),
    6: (4, 2),
}


class PackedField(NamedTuple):
    """One power-of-two field of a packed code (see the module docstring).

    Attributes:
      bits: width of the field in bits (1, 2, 4 or 8).
      shift: position of the field's lowest bit in the code.
      per_byte: values of this field in one byte, ``8 // bits``.
    """

    bits: int
    shift: int
    per_byte: int


def _check_bits(bits) -> int:
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or (int(bits) not in SUPPORTED_BITS):
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits!r}")
    return int(bits)


def packed_fields(bits: int) -> tuple[PackedField, ...]:
    """The fields a ``bits``-bit code is split into, low bits first.

    Example: ``packed_fields(3) == (PackedField(2, 0, 4), PackedField(1, 2, 8))``.
    """
    bits = _check_bits(bits)
    fields, shift = [], 0
    for fb in _FIELD_BITS[bits]:
        fields.append(PackedField(bits=fb, shift=shift, per_byte=8 // fb))
        shift += fb
    return tuple(fields)


def pack_group(bits: int) -> int:
    """Codes per packing group ``g``: the packed axis is padded to a multiple of ``g``."""
    return max(f.per_byte for f in packed_fields(bits))


def padded_length(n: int, bits: int) -> int:
    """``n`` rounded up to a multiple of the packing group ``g`` of ``bits``."""
    g = pack_group(bits)
    return -(-int(n) // g) * g


def packed_length(n: int, bits: int) -> int:
    """Bytes that ``n`` codes of ``bits`` bits take along the packed axis.

    ``packed_length(n, bits) = ceil(n / g) * g * bits / 8`` with ``g = pack_group(bits)``;
    e.g. ``packed_length(100, 4) == 50``, ``packed_length(100, 3) == 39`` (100 -> 104 codes).
    """
    if int(n) < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    return padded_length(n, bits) * _check_bits(bits) // 8


def field_row_offsets(n: int, bits: int) -> tuple[int, ...]:
    """Start of each field's section along the packed axis, for ``n`` codes."""
    kp = padded_length(n, bits)
    offsets, off = [], 0
    for f in packed_fields(bits):
        offsets.append(off)
        off += kp // f.per_byte
    return tuple(offsets)


def _normalize_axis(axis: int, ndim: int) -> int:
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis {axis} is out of range for an array of rank {ndim}")
    return axis % ndim


def pack_codes(codes: jax.typing.ArrayLike, bits: int, axis: int = 0) -> jax.Array:
    """Packs unsigned ``bits``-bit codes into ``uint8`` along ``axis``.

    Args:
      codes: integer array, values in ``[0, 2**bits - 1]``, e.g. ``[K, N]``.
      bits: one of ``SUPPORTED_BITS``.
      axis: the axis to pack (K of a ``[K, N]`` weight by default).

    Returns:
      ``uint8`` array with ``codes.shape[axis]`` replaced by ``packed_length(K, bits)``, laid out
      as the module docstring says.

    Raises:
      ValueError: bad ``bits``/``axis``, a non-integer ``codes``, or (for concrete inputs) a code
        outside ``[0, 2**bits - 1]``. Under ``jit`` the range can't be checked and each code is
        masked to its low ``bits`` bits.
    """
    bits = _check_bits(bits)
    codes = jnp.asarray(codes)
    if codes.ndim == 0:
        raise ValueError("codes must have at least one axis, got a scalar")
    if not jnp.issubdtype(codes.dtype, jnp.integer):
        raise ValueError(f"codes must be an integer array, got dtype {codes.dtype}")
    axis = _normalize_axis(axis, codes.ndim)
    try:
        host = np.asarray(codes)  # concrete input: check the range on the host
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        host = None  # traced under jit: no check
    if host is not None and host.size:
        lo, hi = int(host.min()), int(host.max())
        if lo < 0 or hi > 2**bits - 1:
            raise ValueError(f"codes must lie in [0, {2**bits - 1}] for bits={bits}, got values in [{lo}, {hi}]")

    return _pack(codes, bits=bits, axis=axis)


@functools.partial(jax.jit, static_argnames=("bits", "axis"))
def _pack(codes, *, bits, axis):
    q = jnp.moveaxis(codes, axis, 0).astype(jnp.uint32) & jnp.uint32(2**bits - 1)
    n, rest = q.shape[0], q.shape[1:]
    kp = padded_length(n, bits)
    q = jnp.pad(q, [(0, kp - n)] + [(0, 0)] * len(rest))
    sections = []
    for f in packed_fields(bits):
        v = (q >> f.shift) & jnp.uint32(2**f.bits - 1)
        v = v.reshape((kp // f.per_byte, f.per_byte) + rest)
        byte = jnp.zeros((kp // f.per_byte,) + rest, jnp.uint32)
        for s in range(f.per_byte):
            byte = byte | (v[:, s] << (s * f.bits))
        sections.append(byte.astype(jnp.uint8))
    packed = jnp.concatenate(sections, axis=0) if len(sections) > 1 else sections[0]
    return jnp.moveaxis(packed, 0, axis)


def unpack_codes(
    packed: jax.typing.ArrayLike,
    bits: int,
    length: int,
    axis: int = 0,
    dtype: jax.typing.DTypeLike = jnp.int32,
) -> jax.Array:
    """Inverse of ``pack_codes``: ``unpack_codes(pack_codes(q, b), b, q.shape[0]) == q``.

    Args:
      packed: ``uint8`` array from ``pack_codes``.
      bits: the bit-width it was packed with.
      length: the true (unpadded) number of codes along ``axis``.
      axis: the packed axis.
      dtype: integer dtype of the result (``int32`` by default; ``uint8`` also holds any code).

    Returns:
      Codes of ``dtype`` with ``packed.shape[axis]`` replaced by ``length``.

    Raises:
      ValueError: bad ``bits``/``axis``/``dtype``, a non-``uint8`` input, or
        ``packed.shape[axis] != packed_length(length, bits)``.
    """
    bits = _check_bits(bits)
    packed = jnp.asarray(packed)
    if packed.dtype != jnp.uint8:
        raise ValueError(f"packed must be uint8, got dtype {packed.dtype}")
    if packed.ndim == 0:
        raise ValueError("packed must have at least one axis, got a scalar")
    if not jnp.issubdtype(jnp.dtype(dtype), jnp.integer):
        raise ValueError(f"dtype must be an integer dtype, got {dtype}")
    axis = _normalize_axis(axis, packed.ndim)
    length = int(length)
    expected = packed_length(length, bits)
    if packed.shape[axis] != expected:
        raise ValueError(
            f"packed.shape[{axis}] = {packed.shape[axis]} does not match length={length} at "
            f"bits={bits}: expected packed_length({length}, {bits}) = {expected}"
        )

    return _unpack(packed, bits=bits, length=length, axis=axis, dtype=jnp.dtype(dtype))


@functools.partial(jax.jit, static_argnames=("bits", "length", "axis", "dtype"))
def _unpack(packed, *, bits, length, axis, dtype):
    p = jnp.moveaxis(packed, axis, 0).astype(jnp.uint32)
    rest = p.shape[1:]
    kp = padded_length(length, bits)
    q = jnp.zeros((kp,) + rest, jnp.uint32)
    for f, off in zip(packed_fields(bits), field_row_offsets(length, bits)):
        section = p[off : off + kp // f.per_byte]
        mask = jnp.uint32(2**f.bits - 1)
        vals = jnp.stack([(section >> (s * f.bits)) & mask for s in range(f.per_byte)], axis=1)
        q = q | (vals.reshape((kp,) + rest) << f.shift)
    return jnp.moveaxis(q[:length].astype(dtype), 0, axis)


__all__ = [
    "SUPPORTED_BITS",
    "PackedField",
    "field_row_offsets",
    "pack_codes",
    "pack_group",
    "packed_fields",
    "packed_length",
    "padded_length",
    "unpack_codes",
]
