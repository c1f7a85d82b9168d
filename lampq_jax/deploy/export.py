"""Export a quantization result as real low-bit tensors: packed codes, per-channel scale and zero point.

Each quantized layer's kernel becomes a `QuantizedTensor`: a [K, N] matrix of integer codes packed
along K (N = output channels, K = everything else), at the layer's weight bits:

    Dense          [in, out]            -> [in, out]
    DenseGeneral   [D, H, hd] (q, k, v) -> [D, H·hd]
                   [H, hd, D] (out)     -> [H·hd, D]
    Conv           [kh, kw, cin, cout]  -> [kh·kw·cin, cout]
    Einsum         any                  -> [contraction axes (in order), output axes (in order)]

Exact codes. A result holds only the fake-quantized kernels ŵ = (q − z)·s (per output channel,
scale s and zero point z chosen by a clipping search on the original, float kernel), not s, z
or q. Min-max on ŵ does not recover them: a channel need not use its grid's end codes (the
range always contains 0, so an all-positive channel never uses code 0), and min-max then gives
a finer, wrong grid. Instead every column is solved for its grid:

    1. Every value of a column is n·s with an integer n = q − z, |n| ≤ 2^b − 1, and 0 is on
       the grid, so the gaps between the column's sorted distinct values (0 included) are
       integer multiples of s. The smallest gap g is k·s for some integer k ≥ 1.
    2. For m = 1, 2, ...: take s' = g / m, n = round(ŵ / s'), refine s' by least squares
       (s' = Σ ŵ·n / Σ n²), round n again, and accept the first m whose integers span at most
       2^b − 1 codes and for which some float s'' within a few ulps of s' reproduces every
       value exactly: float32(n · s'') == ŵ, bit for bit (the fake quantizer computes
       (q − z)·s in float32, with (q − z) an exact small integer). m = k always succeeds with
       the true s, so the search ends; a smaller m that succeeds is an equally exact grid.
    3. z is any integer with 0 ≤ n + z ≤ 2^b − 1 (z = max(0, −min n)); q = n + z.

So the exported tensor dequantizes to the fake-quantized kernel exactly, and a column that lies
on no b-bit uniform grid (a kernel that was not fake-quantized, or changed afterwards) raises a
`ValueError` naming the layer and channels. An all-zero column gets s = 1, z = 0.

Widths: packing stores 2, 3, 4, 5, 6 and 8 bits densely (`quant.packing.SUPPORTED_BITS`); a
7-bit layer is stored in the 8-bit container (codes in [0, 127]); the sidecar records both.

Example:
    >>> tensors = export_result(result)                  # {layer path: QuantizedTensor}
    >>> save_export("vit_q.npz", tensors, result)        # vit_q.npz + vit_q.json
    >>> tensors, meta = load_export("vit_q.npz")
    >>> export_nbytes(tensors, result.quantized.variables) / (4 * num_params)
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping, NamedTuple, Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict

from lampq_jax.apply.model import QuantizedModel
from lampq_jax.quant import check_bits, packing
from lampq_jax.quant.qtensor import QuantizedTensor, load_qtensors, save_qtensors


class ExportableResult(Protocol):
    """What export reads of a `lampq_jax.result.QuantizationResult`.

    Typed by its fields, so that this module does not import `result` (which imports it for
    `QuantizationResult.export`): imports stay one way.
    """

    quantized: QuantizedModel
    method: str


EXPORT_FORMAT = "lampq_jax.export/1"

# ulps around the least-squares step that are tried for an exact reproduction
_ULP_SEARCH = 4
# largest |round(ŵ / s) − ŵ / s| accepted before the exact check (a filter only)
_INTEGER_TOLERANCE = 1e-3


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
    """A kernel as its [K, N] matrix (see the module docstring) and the permuted kernel shape.

    Args:
      kernel: [...] any layout; `out_axes` index its output channels.

    Returns:
      (matrix [K, N], shape of the kernel with the output axes moved last).
    """
    kernel = np.asarray(kernel)
    perm = kernel_permutation(kernel.ndim, out_axes)
    moved = np.transpose(kernel, perm)
    n = math.prod(kernel.shape[a % kernel.ndim] for a in out_axes)
    return moved.reshape(-1, n), tuple(moved.shape)


def restore_kernel(tensor: QuantizedTensor, out_axes: Sequence[int], dtype: Any = None) -> jax.Array:
    """The dequantized kernel of an exported layer, in the layer's own layout (inverse of `kernel_matrix`)."""
    ndim = len(tensor.shape)
    perm = kernel_permutation(ndim, out_axes)
    moved = tensor.dequantize(dtype).reshape(tensor.shape)
    return jnp.transpose(moved, np.argsort(perm))


def _ulp_candidates(scale: np.ndarray) -> list[np.ndarray]:
    """float32 steps at 0, +1, −1, +2, −2, ... ulps from `scale`."""
    out, up, down = [scale], scale, scale
    for _ in range(_ULP_SEARCH):
        up = np.nextafter(up, np.float32(np.inf))
        down = np.nextafter(down, np.float32(0))
        out += [up, down]
    return out


def grid_codes(
    w: jax.typing.ArrayLike, bits: int, *, name: str = "kernel"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Integer codes, scale and zero point of a [K, N] matrix whose columns lie on b-bit uniform grids.

    Solves each column for its grid (module docstring) so that, in float32 and then `w`'s dtype,

        (codes − zero_point) · scale == w          exactly.

    Args:
      w: [K, N] float, every column on a uniform grid {(q − z)·s : q = 0 .. 2^b − 1} (as the
        fake-quantized kernels of a result are).
      bits: b, in [2, 8].
      name: named in errors.

    Returns:
      (codes int32 [K, N] in [0, 2^b − 1], scale float32 [N], zero_point float32 [N]).

    Raises:
      ValueError: a column on no b-bit uniform grid (the message names the channels), a non-float
        or non-finite `w`, or a `w` that is not 2-D.
    """
    container_bits(bits)  # checks bits
    levels = 2 ** int(bits) - 1
    w = np.asarray(w)
    if w.ndim != 2:
        raise ValueError(f"{name}: expected a [K, N] matrix, got shape {w.shape}")
    if not np.issubdtype(w.dtype, np.floating) and w.dtype.name != "bfloat16":
        raise ValueError(f"{name}: expected a float matrix, got dtype {w.dtype}")
    v = w.astype(np.float64)
    if not np.isfinite(v).all():
        raise ValueError(f"{name}: the kernel holds NaN or Inf")
    k, n_cols = v.shape

    # Smallest positive gap between the sorted distinct values of each column, 0 included.
    ordered = np.sort(np.concatenate([v, np.zeros((1, n_cols))], axis=0), axis=0)
    gaps = np.diff(ordered, axis=0)
    gap = np.where(gaps > 0, gaps, np.inf).min(axis=0)

    scale = np.ones(n_cols, np.float32)
    ints = np.zeros((k, n_cols), np.int64)
    solved = ~np.isfinite(gap)  # all-zero columns: s = 1, n = 0
    for m in range(1, levels + 1):
        cols = np.flatnonzero(~solved)
        if cols.size == 0:
            break
        with np.errstate(divide="ignore", invalid="ignore"):  # NaN steps fail the checks
            vc = v[:, cols]
            step = gap[cols] / m
            n = np.rint(vc / step)
            step = (vc * n).sum(axis=0) / (n * n).sum(axis=0)  # n ≠ 0 somewhere: |ŵ| ≥ gap for ŵ ≠ 0
            n = np.rint(vc / step)
            step = (vc * n).sum(axis=0) / (n * n).sum(axis=0)
            # near-integer ratios, and codes n + z that fit [0, 2^b − 1] with z = max(0, −min n)
            fits = np.abs(vc / step - n).max(axis=0) <= _INTEGER_TOLERANCE
            fits &= np.maximum(n.max(axis=0), 0) - np.minimum(n.min(axis=0), 0) <= levels
        found = np.zeros(cols.size, bool)
        chosen = np.ones(cols.size, np.float32)
        n32 = n.astype(np.float32)
        target = w[:, cols]
        for candidate in _ulp_candidates(step.astype(np.float32)):
            todo = fits & ~found
            if not todo.any():
                break
            idx = np.flatnonzero(todo)
            recon = (n32[:, idx] * candidate[idx]).astype(w.dtype)
            exact = (recon == target[:, idx]).all(axis=0)
            hit = idx[exact]
            chosen[hit] = candidate[hit]
            found[hit] = True
        hit_cols = cols[found]
        scale[hit_cols] = chosen[found]
        ints[:, hit_cols] = n[:, found].astype(np.int64)
        solved[hit_cols] = True
    if not solved.all():
        bad = np.flatnonzero(~solved)
        raise ValueError(
            f"{name}: {bad.size} of {n_cols} output channel(s) (e.g. {bad[:5].tolist()}) do not lie on a "
            f"{bits}-bit uniform grid (q − z)·s; export needs the fake-quantized kernels of a result, unchanged"
        )
    zero_point = np.maximum(0, -ints.min(axis=0))
    codes = ints + zero_point
    if codes.size and (codes.min() < 0 or codes.max() > levels):  # excluded by the search; kept as a guard
        raise ValueError(f"{name}: recovered codes fall outside [0, {levels}] for bits={bits}")
    return codes.astype(np.int32), scale, zero_point.astype(np.float32)


def export_layer(
    kernel: jax.typing.ArrayLike, bits: int, out_axes: Sequence[int], *, name: str = "kernel"
) -> QuantizedTensor:
    """One fake-quantized kernel as a `QuantizedTensor` in the container of `bits` (module docstring).

    The tensor's `shape` is the kernel's shape with the output axes moved last (the identity for
    Dense, DenseGeneral and Conv); `restore_kernel` gives back the original layout.

    Raises:
      ValueError: the kernel is not on a `bits`-bit per-channel grid (named).
    """
    kernel = np.asarray(jax.device_get(kernel))
    matrix, shape = kernel_matrix(kernel, out_axes)
    codes, scale, zero_point = grid_codes(matrix, bits, name=name)
    back = ((codes.astype(np.float32) - zero_point) * scale).astype(matrix.dtype)
    if not np.array_equal(back, matrix):  # excluded by `grid_codes`; kept as a guard
        raise ValueError(f"{name}: the recovered codes do not reproduce the kernel")
    return QuantizedTensor.from_codes(codes, scale, zero_point, container_bits(bits), shape=shape, dtype=matrix.dtype)


def export_result(result: ExportableResult) -> dict[str, QuantizedTensor]:
    """Every quantized layer of `result` as packed low-bit codes at its weight bits.

    Args:
      result: a `QuantizationResult` (from `quantize`, `quantize_uniform` or `load_result`).

    Returns:
      {layer path: QuantizedTensor}, in the order of `result.quantized.spec.layers`; each
      dequantizes to the result's fake-quantized kernel exactly (module docstring). A 7-bit layer
      has `bits == 8` (its container); `result.bits` keeps its true width.

    Raises:
      ValueError: a layer of the spec without a kernel, or a kernel not on its grid (named).
    """
    quantized = result.quantized
    layers = {l.path: l for l in quantized.layers}
    params = flatten_dict(dict(quantized.variables)["params"], sep="/")
    tensors = {}
    for path, wbits, _ in quantized.spec.layers:
        key = f"{path}/kernel"
        if key not in params:
            raise ValueError(f"layer {path!r} has no kernel in the result's variables (looked for 'params/{key}')")
        if path not in layers:
            raise ValueError(f"layer {path!r} of the spec is not among the result's layers")
        tensors[path] = export_layer(params[key], wbits, layers[path].out_axes, name=f"layer {path!r}")
    return tensors


def export_nbytes(tensors: Mapping[str, QuantizedTensor], variables: Any) -> int:
    """Bytes of a deployed model: packed codes + float32 scales and zero points + every other param in float32.

        bytes = Σ_exported (packed bytes + 8·N) + 4 · (#params − Σ_exported |W|)

    Args:
      tensors: {layer path: QuantizedTensor} from `export_result`.
      variables: the model's variables ({'params': ...}); the kernel of each exported layer,
        'params/<path>/kernel', is counted through its tensor instead.

    Raises:
      ValueError: an exported layer whose kernel is missing or of another size (named).
    """
    tree = dict(variables)
    params = flatten_dict(dict(tree["params"]) if "params" in tree else tree, sep="/")
    sizes = {k: int(np.prod(np.shape(v))) for k, v in params.items()}
    total = 0
    for path, tensor in tensors.items():
        key = f"{path}/kernel"
        if key not in sizes:
            raise ValueError(f"exported layer {path!r} has no kernel in the variables (looked for 'params/{key}')")
        if sizes[key] != math.prod(tensor.shape):
            raise ValueError(
                f"exported layer {path!r} has {math.prod(tensor.shape)} weights but the kernel "
                f"'params/{key}' has {sizes[key]}"
            )
        total += tensor.nbytes
        sizes.pop(key)
    return total + 4 * sum(sizes.values())


class LoadedExport(NamedTuple):
    """What `load_export` returns: the tensors and the sidecar's description of them."""

    tensors: dict[str, QuantizedTensor]
    meta: dict[str, Any]


def _sidecar(path: Path) -> Path:
    if path.suffix != ".npz":
        raise ValueError(
            f"export path must end in '.npz' (the sidecar is the same name with '.json'), got {str(path)!r}"
        )
    return path.with_suffix(".json")


def save_export(path: str | os.PathLike, tensors: Mapping[str, QuantizedTensor], result: ExportableResult) -> Path:
    """Writes `path` (.npz, the tensors) and its sidecar `path` with '.json' (bits and layout per layer).

    Both files are written to temporary files beside them and moved into place with `os.replace`,
    so a reader never sees a half-written file. The sidecar holds, per layer: weight and activation
    bits, the container bits, kind, type, kernel shape and output axes; and the attention bits.

    Returns:
      The sidecar's path.

    Raises:
      ValueError: `path` does not end in '.npz', or a tensor is not a layer of the result.
    """
    path = Path(path)
    side = _sidecar(path)
    bits = result.quantized.spec.bits
    layers = {l.path: l for l in result.quantized.layers}
    unknown = sorted(set(tensors) - set(bits))
    if unknown:
        raise ValueError(f"tensors {unknown[:5]} are not quantized layers of the result")
    meta = {
        "format": EXPORT_FORMAT,
        "method": result.method,
        "layers": {
            name: {
                "weight_bits": bits[name][0],
                "act_bits": bits[name][1],
                "container_bits": tensor.bits,
                "kind": layers[name].kind,
                "type": layers[name].type,
                "weight_shape": list(layers[name].weight_shape),
                "out_axes": list(layers[name].out_axes),
                "matrix_shape": list(tensor.matrix_shape),
            }
            for name, tensor in tensors.items()
        },
        "attention_bits": dict(result.quantized.spec.attention),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=side.parent, prefix=".tmp-", suffix=".json")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(meta, f, indent=1)
        save_qtensors(path, tensors)
        os.replace(tmp, side)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return side


def load_export(path: str | os.PathLike) -> LoadedExport:
    """Reads the files written by `save_export`; the tensors are bit for bit those saved.

    Raises:
      FileNotFoundError: the .npz or its sidecar is missing.
      ValueError: an unknown format, or a sidecar that does not describe the tensors.
    """
    path = Path(path)
    side = _sidecar(path)
    for f in (path, side):
        if not f.is_file():
            raise FileNotFoundError(f"{f} is missing (save_export writes {path.name} and {side.name})")
    meta = json.loads(side.read_text())
    if meta.get("format") != EXPORT_FORMAT:
        raise ValueError(f"{side}: format {meta.get('format')!r}, want {EXPORT_FORMAT!r}")
    tensors = load_qtensors(path)
    if set(tensors) != set(meta["layers"]):
        raise ValueError(f"{side} describes layers {sorted(meta['layers'])[:5]} but {path} holds {sorted(tensors)[:5]}")
    for name, tensor in tensors.items():
        entry = meta["layers"][name]
        if entry["container_bits"] != tensor.bits or container_bits(entry["weight_bits"]) != tensor.bits:
            raise ValueError(
                f"layer {name!r}: sidecar says {entry['weight_bits']}-bit weights in a "
                f"{entry['container_bits']}-bit container, the tensor has bits={tensor.bits}"
            )
    return LoadedExport(tensors, meta)


__all__ = [
    "EXPORT_FORMAT",
    "LoadedExport",
    "container_bits",
    "export_layer",
    "export_nbytes",
    "export_result",
    "grid_codes",
    "kernel_matrix",
    "kernel_permutation",
    "load_export",
    "restore_kernel",
    "save_export",
]
