"""The result of a quantization run: the quantized model, its bits, its report; saved and reloaded."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from lampq_jax.apply.fake import QuantSpec, with_weights
from lampq_jax.apply.model import QuantizedModel
from lampq_jax.layers.discovery import Layer
from lampq_jax.models.vit import ViT
from lampq_jax.quant.qtensor import QuantizedTensor

# 2: the quantized kernels are stored as their codes and grids (`QuantizedModel.weights`), not as floats.
RESULT_FORMAT = 2


@dataclasses.dataclass(eq=False)
class QuantizationResult:
    """What `quantize` and `quantize_uniform` return.

    Attributes:
      quantized: the quantized model (`.apply` runs it).
      method: 'uniform', 'lampq' or a baseline's name.
      report: figures of the run (METHOD.md §9), JSON-serializable.
      timings: seconds per stage.
      rules: the user's (regex, type) rules the layers were typed with; saved, so that a reload needs none
        (the saved layers keep their types).
      synthetic_images: [N, ...] the calibration images of a zero-shot run (not saved by `save`).
    """

    quantized: QuantizedModel
    method: str
    report: dict[str, Any] = dataclasses.field(default_factory=dict)
    timings: dict[str, float] = dataclasses.field(default_factory=dict)
    rules: tuple[tuple[str, str], ...] = ()
    synthetic_images: Optional[np.ndarray] = None

    @property
    def bits(self) -> dict[str, tuple[int, int]]:
        """{layer path: (weight bits, activation bits)}."""
        return self.quantized.bits

    @property
    def attention_bits(self) -> dict[str, int]:
        """{attention path: bits of its q, k, v and softmax output}."""
        return dict(self.quantized.spec.attention)

    def apply(self, *args: Any, **kwargs: Any) -> Any:
        """Runs the quantized model on new inputs (jitted; quantization-time apply kwargs unless overridden)."""
        return self.quantized.apply(*args, **kwargs)

    def export(self) -> dict:
        """{layer path: QuantizedTensor}: packed low-bit codes of every quantized layer (`lampq_jax.deploy.export.export_result`)."""
        from lampq_jax.deploy.export import export_result

        return export_result(self)

    def save(self, directory: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Writes `allocation.json`, `report.json` and `arrays.npz` into `directory`, atomically.

        The files are written into a temporary folder beside `directory` that is renamed into place,
        so a failure leaves no partial result. An existing `directory` is an error unless `overwrite`.
        """
        target = Path(directory)
        if target.exists() and not overwrite:
            raise FileExistsError(f"{target} exists; pass overwrite=True to replace it")
        target.parent.mkdir(parents=True, exist_ok=True)
        q = self.quantized
        allocation = {
            "format": RESULT_FORMAT,
            "method": self.method,
            "bits": {p: list(b) for p, b in self.bits.items()},
            "attention_bits": self.attention_bits,
            "weight_grid": list(q.spec.weight_grid) if q.spec.weight_grid else None,
            "apply_kwargs": q.apply_kwargs,
            "model": _model_config(q.model),
            "type_rules": [list(r) for r in self.rules],
            "layers": [dataclasses.asdict(l) for l in q.layers],
            "weights": {
                p: {"bits": t.bits, "shape": list(t.shape), "dtype": t.dtype.name} for p, t in q.weights.items()
            },
        }
        coded = {f"params/{p}/kernel" for p in q.weights}
        flat = flatten_dict(_plain(q.variables), sep="/")
        arrays = {f"variables/{k}": np.asarray(v) for k, v in flat.items() if k not in coded}
        arrays.update({f"act_params/{site}": np.asarray(t) for site, t in q.act_params.items()})
        for p, t in q.weights.items():
            arrays.update({f"weights/{p}/{f}": np.asarray(getattr(t, f)) for f in ("packed", "scale", "zero_point")})
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            (tmp / "allocation.json").write_text(json.dumps(allocation, indent=1))
            (tmp / "report.json").write_text(
                json.dumps({"report": self.report, "timings": self.timings}, indent=1, default=_json_default)
            )
            np.savez(tmp / "arrays.npz", **arrays)
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return target


def _plain(tree: Any) -> dict:
    return {k: _plain(v) for k, v in tree.items()} if hasattr(tree, "items") else tree


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, tuple):
        return list(value)
    return str(value)


def _model_config(model: nn.Module) -> Optional[dict[str, Any]]:
    """Fields of a lampq_jax ViT (to rebuild it on load); None for other models."""
    if not isinstance(model, ViT):
        return None
    fields = {f.name: getattr(model, f.name) for f in dataclasses.fields(ViT) if f.name not in ("parent", "name")}
    fields.pop("dtype")
    fields["patch_size"] = list(fields["patch_size"])
    return fields


def _read_json(folder: Path, name: str) -> dict:
    """The JSON object in folder/name, or a ValueError naming the file when it is not one."""
    try:
        data = json.loads((folder / name).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{folder / name} is not valid JSON ({err}); {folder} is not a valid saved result") from None
    if not isinstance(data, dict):
        raise ValueError(
            f"{folder / name} holds a {type(data).__name__}, not an object; {folder} is not a valid saved result"
        )
    return data


def load_result(directory: str | os.PathLike, model: Optional[nn.Module] = None) -> QuantizationResult:
    """Reloads a saved result; its `apply` gives outputs identical to the saved one's.

    Args:
      directory: a folder written by `QuantizationResult.save`.
      model: the flax.linen module; needed unless the result was made from a lampq_jax ViT.
    """
    folder = Path(directory)
    for name in ("allocation.json", "report.json", "arrays.npz"):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder} is not a saved result: {name} is missing")
    allocation = _read_json(folder, "allocation.json")
    if allocation.get("format") != RESULT_FORMAT:
        raise ValueError(
            f"{folder}: result format {allocation.get('format')!r}, this lampq_jax reads format {RESULT_FORMAT} "
            "(format 1 stored float kernels without their codes: quantize again to save it anew)"
        )
    if model is None:
        if allocation["model"] is None:
            raise ValueError(f"{folder} was made from a model that is not a lampq_jax ViT; pass model=")
        config = dict(allocation["model"])
        config["patch_size"] = tuple(config["patch_size"])
        model = ViT(**config)
    stored = _read_json(folder, "report.json")
    with np.load(folder / "arrays.npz") as npz:
        variables = unflatten_dict(
            {k[len("variables/") :]: npz[k] for k in npz.files if k.startswith("variables/")}, sep="/"
        )
        act_params = {k[len("act_params/") :]: npz[k] for k in npz.files if k.startswith("act_params/")}
        weights = {
            p: QuantizedTensor(
                *(jnp.asarray(npz[f"weights/{p}/{f}"]) for f in ("packed", "scale", "zero_point")),
                bits=meta["bits"],
                shape=tuple(meta["shape"]),
                dtype=jnp.dtype(meta["dtype"]),
            )
            for p, meta in allocation["weights"].items()
        }
    layers = tuple(
        Layer(
            **{
                **l,
                "weight_shape": tuple(l["weight_shape"]),
                "out_axes": tuple(l["out_axes"]),
                "input_shape": tuple(l["input_shape"]),
                "output_shape": tuple(l["output_shape"]),
            }
        )
        for l in allocation["layers"]
    )
    spec = QuantSpec.build(
        layers,
        {p: tuple(b) for p, b in allocation["bits"].items()},
        attention_bits=allocation["attention_bits"],
        weight_grid=allocation["weight_grid"],
    )
    variables = with_weights(variables, layers, weights)
    quantized = QuantizedModel(model, layers, spec, variables, act_params, dict(allocation["apply_kwargs"]), weights)
    rules = tuple((str(p), str(t)) for p, t in allocation.get("type_rules", []))  # absent in older saves
    return QuantizationResult(
        quantized=quantized,
        method=allocation["method"],
        report=stored["report"],
        timings=stored["timings"],
        rules=rules,
    )
