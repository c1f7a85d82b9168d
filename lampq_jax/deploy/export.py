"""Export a quantization result as real low-bit tensors: packed codes, per-channel scale and zero point.

Each quantized layer's kernel becomes a `QuantizedTensor`: a [K, N] matrix of integer codes packed
along K (N = output channels, K = everything else), at the layer's weight bits:

    Dense          [in, out]            -> [in, out]
    DenseGeneral   [D, H, hd] (q, k, v) -> [D, H·hd]
                   [H, hd, D] (out)     -> [H·hd, D]
    Conv           [kh, kw, cin, cout]  -> [kh·kw·cin, cout]
    Einsum         any                  -> [contraction axes (in order), output axes (in order)]

Exact codes. A result keeps every quantized kernel's codes and grid (`QuantizedModel.weights`, made by
`apply.fake.quantize_weights` when the kernels were quantized), and its variables hold their dequantized
values (q − z)·s. Export hands those tensors out, so the exported codes are the ones the fake-quantized
model ran with, bit for bit; nothing is searched for again.

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
import numpy as np
from flax.traverse_util import flatten_dict

from lampq_jax.apply.model import QuantizedModel
from lampq_jax.quant.qtensor import (
    QuantizedTensor,
    container_bits,
    kernel_matrix,
    kernel_permutation,
    load_qtensors,
    save_qtensors,
)


class ExportableResult(Protocol):
    """What export reads of a `lampq_jax.result.QuantizationResult`.

    Typed by its fields, so that this module does not import `result` (which imports it for
    `QuantizationResult.export`): imports stay one way.
    """

    quantized: QuantizedModel
    method: str


EXPORT_FORMAT = "lampq_jax.export/1"


def restore_kernel(tensor: QuantizedTensor, out_axes: Sequence[int], dtype: Any = None) -> jax.Array:
    """The dequantized kernel of an exported layer, in the layer's own layout (inverse of `kernel_matrix`)."""
    return tensor.kernel(tuple(out_axes), dtype)


def export_result(result: ExportableResult) -> dict[str, QuantizedTensor]:
    """Every quantized layer of `result` as packed low-bit codes at its weight bits.

    Args:
      result: a `QuantizationResult` (from `quantize`, `quantize_uniform` or `load_result`).

    Returns:
      {layer path: QuantizedTensor}, in the order of `result.quantized.spec.layers`: the codes and grids
      the result's kernels were made from (`QuantizedModel.weights`), each dequantizing to its kernel
      exactly. A 7-bit layer has `bits == 8` (its container); `result.bits` keeps its true width.

    Raises:
      ValueError: a layer of the spec without its codes (a `QuantizedModel` built by hand), named.
    """
    quantized = result.quantized
    missing = [path for path, _, _ in quantized.spec.layers if path not in quantized.weights]
    if missing:
        raise ValueError(
            f"layer(s) {missing[:5]} have no codes in the result (QuantizedModel.weights); build the model with "
            "QuantizedModel.create, quantize or quantize_uniform, or reload a saved result"
        )
    return {path: quantized.weights[path] for path, _, _ in quantized.spec.layers}


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
    "export_nbytes",
    "export_result",
    "kernel_matrix",
    "kernel_permutation",
    "load_export",
    "restore_kernel",
    "save_export",
]
