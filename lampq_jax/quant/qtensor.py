"""``QuantizedTensor``: a weight stored as packed low-bit codes with per-channel scale and zero.

A ``[K, N]`` weight (K = input/contracting features, N = output channels) is quantized per
output channel, asymmetric and uniform (min-max range unless the caller gives its own)::

    scale[n]      = (hi[n] - lo[n]) / (2**bits - 1)
    zero_point[n] = round(-lo[n] / scale[n])                 (integer-valued, stored as f32)
    q[k, n]       = clip(round(w[k, n] / scale[n]) + zero_point[n], 0, 2**bits - 1)
    w_hat[k, n]   = (q[k, n] - zero_point[n]) * scale[n]

with ``lo = min_k w``, ``hi = max_k w``. A constant channel (``hi == lo``) gets
``scale = |lo|`` (1 when ``lo == 0``) so that it dequantizes exactly. The codes are packed
along K with ``lampq_jax.quant.packing`` (dense: ``bits / 8`` bytes a code).

``QuantizedTensor`` is a pytree: ``packed``, ``scale`` and ``zero_point`` are its leaves; ``bits``,
``shape`` (the original kernel shape, e.g. ``[D, heads, head_dim]`` of a ``DenseGeneral``) and
``dtype`` (the original weight dtype) are static metadata, so ``jit`` specializes on them and
never traces them.

Example:
  >>> qt = QuantizedTensor.from_float(w, bits=4)         # w: [768, 3072] float32
  >>> qt.nbytes / w.nbytes                               # ~ 4/32 + 8/(4 * 768)
  >>> save_qtensors("model_q.npz", {"fc1": qt}); load_qtensors("model_q.npz")["fc1"]
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import tempfile
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lampq_jax.quant import packing
from lampq_jax.quant.uniform import UniformParams, check_bits, dequantize, quantize


@dataclasses.dataclass(frozen=True)
class QuantizedTensor:
    """A ``[K, N]`` weight as packed ``bits``-bit codes, per-output-channel scale and zero point.

    Attributes:
      packed: ``uint8 [packing.packed_length(K, bits), N]``: codes packed along K.
      scale: ``float32 [1, N]``.
      zero_point: ``float32 [1, N]`` (integer-valued).
      bits: code width, one of ``packing.SUPPORTED_BITS`` (static).
      shape: the original kernel shape (static); its trailing axes multiply to N and its
        leading axes to K, e.g. ``(768, 3072)`` or ``(768, 12, 64)``.
      dtype: dtype of the original weight (static); ``dequantize()`` returns it.
    """

    packed: jax.Array
    scale: jax.Array
    zero_point: jax.Array
    bits: int
    shape: tuple[int, ...]
    dtype: np.dtype

    def __post_init__(self):
        # Only static fields are checked here: pytree unflattening may fill the leaves with
        # tracers or placeholders. `from_codes` checks the arrays.
        packing.packed_fields(self.bits)  # raises ValueError on a bad bit-width
        object.__setattr__(self, "bits", int(self.bits))
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))
        object.__setattr__(self, "dtype", jnp.dtype(self.dtype))

    # ---- construction -----------------------------------------------------------------------

    @classmethod
    def from_codes(
        cls,
        codes: jax.typing.ArrayLike,
        scale: jax.typing.ArrayLike,
        zero_point: jax.typing.ArrayLike,
        bits: int,
        *,
        shape: tuple[int, ...] | None = None,
        dtype: jax.typing.DTypeLike = jnp.float32,
    ) -> "QuantizedTensor":
        """Builds a ``QuantizedTensor`` from unpacked codes (e.g. from another quantizer).

        Args:
          codes: integer ``[K, N]``, values in ``[0, 2**bits - 1]``.
          scale: ``[N]`` or ``[1, N]``, positive.
          zero_point: ``[N]`` or ``[1, N]``; ``w_hat = (codes - zero_point) * scale``.
          bits: code width.
          shape: original kernel shape (default ``(K, N)``); ``prod(shape) == K * N`` and its
            trailing axes must multiply to N.
          dtype: original weight dtype.
        """
        codes = jnp.asarray(codes)
        if codes.ndim != 2:
            raise ValueError(f"codes must be [K, N], got shape {codes.shape}")
        k, n = codes.shape
        scale = jnp.asarray(scale, jnp.float32).reshape(-1)
        zero_point = jnp.asarray(zero_point, jnp.float32).reshape(-1)
        if scale.shape != (n,) or zero_point.shape != (n,):
            raise ValueError(
                f"scale and zero_point must have N={n} entries, got shapes {scale.shape} and {zero_point.shape}"
            )
        shape = (k, n) if shape is None else tuple(int(d) for d in shape)
        _check_matrix_shape(shape, k, n)
        return cls(
            packed=packing.pack_codes(codes, bits, axis=0),
            scale=scale.reshape(1, n),
            zero_point=zero_point.reshape(1, n),
            bits=bits,
            shape=shape,
            dtype=dtype,
        )

    @classmethod
    def from_float(
        cls,
        w: jax.typing.ArrayLike,
        bits: int,
        *,
        lo: jax.typing.ArrayLike | None = None,
        hi: jax.typing.ArrayLike | None = None,
        shape: tuple[int, ...] | None = None,
    ) -> "QuantizedTensor":
        """Quantizes a float ``[K, N]`` weight per output channel (formula in the module docstring).

        Args:
          w: float ``[K, N]`` (flatten a ``DenseGeneral`` kernel to 2-D first and pass ``shape``).
          bits: code width.
          lo, hi: optional clipping range ``[N]`` (e.g. from a clipping search); default the
            per-channel min and max of ``w``.
          shape: original kernel shape (default ``w.shape``).
        """
        w = jnp.asarray(w)
        if w.ndim != 2:
            raise ValueError(f"w must be a [K, N] matrix, got shape {w.shape}")
        if not jnp.issubdtype(w.dtype, jnp.floating):
            raise ValueError(f"w must be a float array, got dtype {w.dtype}")
        packing.packed_fields(bits)
        codes, scale, zero_point = quantize_per_channel(w, bits, lo=lo, hi=hi)
        return cls.from_codes(codes, scale, zero_point, bits, shape=shape, dtype=w.dtype)

    @classmethod
    def from_kernel(
        cls,
        codes: jax.typing.ArrayLike,
        grid: UniformParams,
        bits: int,
        out_axes: tuple[int, ...],
        *,
        dtype: jax.typing.DTypeLike = jnp.float32,
    ) -> "QuantizedTensor":
        """A kernel's integer codes on its per-output-channel grid, as a tensor in the container of `bits`.

        Args:
          codes: integer, the kernel's shape (any layout), values in [0, 2^bits − 1].
          grid: (scale, zero_point) broadcastable against the kernel, size 1 on every axis but `out_axes`.
          bits: the codes' width in [2, 8]; stored in `container_bits(bits)` (7 -> 8).
          out_axes: the kernel's output-channel axes.
          dtype: the kernel's dtype.

        The tensor's `shape` is the kernel's with the output axes moved last (`kernel_permutation`);
        `kernel(out_axes)` gives back the kernel in its own layout.
        """
        matrix, shape = kernel_matrix(codes, out_axes)
        out = {a % len(shape) for a in out_axes}
        kept = [d if a in out else 1 for a, d in enumerate(np.shape(codes))]
        scale, zero_point = (kernel_matrix(np.broadcast_to(np.asarray(v, np.float32), kept), out_axes)[0] for v in grid)
        return cls.from_codes(matrix, scale, zero_point, container_bits(bits), shape=shape, dtype=dtype)

    # ---- views ------------------------------------------------------------------------------

    @property
    def matrix_shape(self) -> tuple[int, int]:
        """``(K, N)``: the 2-D shape the codes are stored and multiplied in."""
        n = int(self.scale.shape[-1])
        return math.prod(self.shape) // n, n

    @property
    def nbytes(self) -> int:
        """Bytes of packed codes + float32 scales + float32 zero points."""
        return int(self.packed.size) + 4 * int(self.scale.size) + 4 * int(self.zero_point.size)

    def codes(self, dtype: jax.typing.DTypeLike = jnp.int32) -> jax.Array:
        """The unpacked codes, ``[K, N]`` of ``dtype``."""
        k, _ = self.matrix_shape
        return packing.unpack_codes(self.packed, self.bits, k, axis=0, dtype=dtype)

    def dequantize(self, dtype: jax.typing.DTypeLike | None = None) -> jax.Array:
        """``w_hat = (q - zero_point) * scale`` as ``[K, N]`` of ``dtype`` (default ``self.dtype``).

        Computed in float32, then cast. Reshape to ``self.shape`` for the original kernel layout.
        """
        return _dequantize(self, jnp.dtype(self.dtype if dtype is None else dtype))

    def kernel(self, out_axes: tuple[int, ...], dtype: jax.typing.DTypeLike | None = None) -> jax.Array:
        """The dequantized kernel in its own layout (inverse of `from_kernel` with the same `out_axes`)."""
        perm = kernel_permutation(len(self.shape), out_axes)
        return jnp.transpose(self.dequantize(dtype).reshape(self.shape), np.argsort(perm))

    def kernel_codes(self, out_axes: tuple[int, ...], dtype: jax.typing.DTypeLike = jnp.int32) -> jax.Array:
        """The unpacked codes in the kernel's own layout (as `kernel`, before dequantizing)."""
        perm = kernel_permutation(len(self.shape), out_axes)
        return jnp.transpose(self.codes(dtype).reshape(self.shape), np.argsort(perm))

    def grid(self, out_axes: tuple[int, ...]) -> UniformParams:
        """(scale, zero_point) broadcastable against the kernel in its own layout (see `from_kernel`)."""
        ndim = len(self.shape)
        perm = kernel_permutation(ndim, out_axes)
        original = [self.shape[perm.index(a)] for a in range(ndim)]
        out = perm[ndim - len(out_axes) :]
        kept = [original[a] if a in out else 1 for a in range(ndim)]
        return UniformParams(
            *(
                jnp.transpose(v.reshape([original[a] for a in out]), np.argsort(out)).reshape(kept)
                for v in (self.scale, self.zero_point)
            )
        )


@functools.partial(jax.jit, static_argnames=("dtype",))
def _dequantize(qt: QuantizedTensor, dtype) -> jax.Array:
    return dequantize(qt.codes(jnp.int32), UniformParams(qt.scale, qt.zero_point)).astype(dtype)


jax.tree_util.register_dataclass(
    QuantizedTensor,
    data_fields=["packed", "scale", "zero_point"],
    meta_fields=["bits", "shape", "dtype"],
)


def _check_matrix_shape(shape: tuple[int, ...], k: int, n: int) -> None:
    if math.prod(shape) != k * n:
        raise ValueError(f"shape {shape} has {math.prod(shape)} elements, but [K, N] = [{k}, {n}]")
    trailing = 1
    for d in reversed(shape):
        trailing *= d
        if trailing == n:
            return
    raise ValueError(f"no trailing axes of shape {shape} multiply to N={n}")


def container_bits(bits: int) -> int:
    """Smallest packed width (`packing.SUPPORTED_BITS`) that holds `bits`-bit codes: 7 -> 8.

    Raises:
      ValueError: `bits` is not an integer in [2, 8].
    """
    bits = check_bits(bits)
    return min(b for b in packing.SUPPORTED_BITS if b >= bits)


def kernel_permutation(ndim: int, out_axes: Sequence[int]) -> tuple[int, ...]:
    """Axis order that puts a kernel's contraction axes first and its output axes last (each in order)."""
    out = tuple(a % ndim for a in out_axes)
    return tuple(a for a in range(ndim) if a not in out) + out


def kernel_matrix(kernel: jax.typing.ArrayLike, out_axes: Sequence[int]) -> tuple[np.ndarray, tuple[int, ...]]:
    """A kernel as its [K, N] matrix (contraction axes first, output axes last, each in order) and the
    permuted kernel shape.

    Args:
      kernel: [...] any layout; `out_axes` index its output channels.

    Returns:
      (matrix [K, N] on the host, shape of the kernel with the output axes moved last).
    """
    kernel = np.asarray(kernel)
    perm = kernel_permutation(kernel.ndim, out_axes)
    moved = np.transpose(kernel, perm)
    n = math.prod(kernel.shape[a % kernel.ndim] for a in out_axes)
    return moved.reshape(-1, n), tuple(moved.shape)


def quantize_per_channel(
    w: jax.Array,
    bits: int,
    *,
    lo: jax.typing.ArrayLike | None = None,
    hi: jax.typing.ArrayLike | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Asymmetric uniform per-output-channel quantization of ``w: [K, N]``.

    Returns ``(codes int32 [K, N], scale f32 [N], zero_point f32 [N])`` with the formula of the
    module docstring.
    """
    packing.packed_fields(bits)
    return _quantize_per_channel(w, lo, hi, bits=int(bits))


@functools.partial(jax.jit, static_argnames=("bits",))
def _quantize_per_channel(w, lo, hi, *, bits):
    """The range [lo, hi] of each column (default its min and max) as a grid, then `uniform.quantize` on it."""
    wf = jnp.asarray(w, jnp.float32)
    lo = jnp.min(wf, axis=0) if lo is None else jnp.asarray(lo, jnp.float32).reshape(-1)
    hi = jnp.max(wf, axis=0) if hi is None else jnp.asarray(hi, jnp.float32).reshape(-1)
    span = hi - lo
    degenerate = jnp.where(jnp.abs(lo) > 0, jnp.abs(lo), 1.0)
    scale = jnp.where(span > 0, span / (2**bits - 1), degenerate)
    zero_point = jnp.round(-lo / scale)
    return quantize(wf, UniformParams(scale, zero_point), bits), scale, zero_point


# ---- files ---------------------------------------------------------------------------------

_FORMAT = "lampq_jax.qtensors/1"


def save_qtensors(path: str | os.PathLike, tensors: Mapping[str, QuantizedTensor]) -> None:
    """Writes ``{name: QuantizedTensor}`` to one ``.npz`` file, atomically.

    The file is written to a temporary file in the same folder, then moved over ``path`` with
    ``os.replace``, so a reader never sees a half-written file. Arrays are stored as ``t<i>.packed``,
    ``t<i>.scale``, ``t<i>.zero_point``; names, bits, shapes and dtypes as JSON in ``__meta__``.
    ``path`` is used as given (no ``.npz`` is appended).
    """
    path = os.fspath(path)
    arrays, meta = {}, {"format": _FORMAT, "tensors": []}
    for i, (name, qt) in enumerate(tensors.items()):
        if not isinstance(qt, QuantizedTensor):
            raise ValueError(f"tensors[{name!r}] must be a QuantizedTensor, got {type(qt).__name__}")
        host = jax.device_get({"packed": qt.packed, "scale": qt.scale, "zero_point": qt.zero_point})
        for key, value in host.items():
            arrays[f"t{i}.{key}"] = np.asarray(value)
        meta["tensors"].append({"name": str(name), "bits": qt.bits, "shape": list(qt.shape), "dtype": qt.dtype.name})
    arrays["__meta__"] = np.array(json.dumps(meta))
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".npz")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def load_qtensors(path: str | os.PathLike) -> dict[str, QuantizedTensor]:
    """Reads a file written by ``save_qtensors``; the tensors are bit-for-bit those saved."""
    with np.load(os.fspath(path), allow_pickle=False) as data:
        if "__meta__" not in data.files:
            raise ValueError(f"{os.fspath(path)!r} is not a save_qtensors file (no __meta__)")
        meta = json.loads(str(data["__meta__"]))
        if meta.get("format") != _FORMAT:
            raise ValueError(f"{os.fspath(path)!r} has format {meta.get('format')!r}, want {_FORMAT!r}")
        out = {}
        for i, entry in enumerate(meta["tensors"]):
            out[entry["name"]] = QuantizedTensor(
                packed=jnp.asarray(data[f"t{i}.packed"]),
                scale=jnp.asarray(data[f"t{i}.scale"]),
                zero_point=jnp.asarray(data[f"t{i}.zero_point"]),
                bits=entry["bits"],
                shape=tuple(entry["shape"]),
                dtype=jnp.dtype(entry["dtype"]),
            )
    return out


__all__ = [
    "QuantizedTensor",
    "container_bits",
    "kernel_matrix",
    "kernel_permutation",
    "load_qtensors",
    "quantize_per_channel",
    "save_qtensors",
]
