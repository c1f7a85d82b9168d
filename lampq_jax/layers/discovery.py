"""Find the quantizable layers of any `flax.linen` model by running it once under an interceptor.

A layer is one linear map with a weight (`nn.Dense`, `nn.DenseGeneral`, `nn.Conv`, `nn.Einsum`).
The model runs abstractly (`jax.eval_shape`), so discovery costs no FLOPs even for ViT-L.

Example:
    >>> layers = find_layers(model, variables, images[:1], train=False)
    >>> [(l.path, l.type, l.group) for l in layers][:3]
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import numpy as np
from flax.traverse_util import flatten_dict

from lampq_jax.layers.types import BUILTIN_RULES, TypeRule, attention_group, check_rules, layer_type

LAYER_KINDS: dict[type, str] = {
    nn.Dense: "dense",
    nn.DenseGeneral: "dense_general",
    nn.Conv: "conv",
    nn.Einsum: "einsum",
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class Layer:
    """One quantizable linear layer of a model.

    Attributes:
      path: '/'-joined module path, e.g. 'Transformer/encoderblock_0/MlpBlock_0/Dense_0'.
      kind: 'dense', 'dense_general', 'conv' or 'einsum'.
      type: 'qkv', 'proj', 'fc1', 'fc2', 'embed', 'head' or 'other' (from the type rules).
      group: layers with the same group share one bit-width (q, k, v of one attention).
      weight_shape: shape of the kernel.
      out_axes: kernel axes that index output channels (per-channel weight quantization).
      num_weights: number of kernel entries |W|.
      macs: multiply-accumulates per example of one call (all calls when `calls` > 1).
      input_shape: shape of the layer's input at discovery, batch first.
      output_shape: shape of its output at discovery, batch first.
      num_activations: input entries per example |A|.
      calls: how many times the model calls the layer in one forward pass.
    """

    path: str
    kind: str
    type: str
    group: str
    weight_shape: tuple[int, ...]
    out_axes: tuple[int, ...]
    num_weights: int
    macs: int
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    num_activations: int
    calls: int = 1


def layer_kind(module: nn.Module) -> Optional[str]:
    """'dense' / 'dense_general' / 'conv' / 'einsum' for a quantizable module, else None."""
    for cls, kind in LAYER_KINDS.items():
        if isinstance(module, cls):
            return kind
    return None


def module_path(module: nn.Module) -> str:
    """'/'-joined scope path of a bound module."""
    return "/".join(str(p) for p in module.scope.path)


def kernel_out_axes(module: nn.Module, kernel_ndim: int) -> tuple[int, ...]:
    """Kernel axes that index output features, for per-output-channel quantization."""
    if isinstance(module, nn.DenseGeneral):
        features = module.features if isinstance(module.features, Sequence) else (module.features,)
        return tuple(range(kernel_ndim - len(features), kernel_ndim))
    if isinstance(module, nn.Einsum):
        operands, out_spec = module.einsum_str.replace(" ", "").split("->")
        kernel_spec = operands.split(",")[1]
        return tuple(i for i, letter in enumerate(kernel_spec) if letter in out_spec)
    return (kernel_ndim - 1,)


def _record(module: nn.Module, x: Any, y: Any) -> dict[str, Any]:
    kernel = module.get_variable("params", "kernel")
    if kernel is None:
        raise ValueError(f"layer {module_path(module)!r} has no 'params/kernel' variable")
    out_axes = kernel_out_axes(module, kernel.ndim)
    out_features = math.prod(kernel.shape[a] for a in out_axes)
    batch = x.shape[0] if x.ndim > 1 else 1
    macs = (math.prod(y.shape) // batch) * (math.prod(kernel.shape) // out_features)
    return dict(
        path=module_path(module),
        kind=layer_kind(module),
        weight_shape=tuple(kernel.shape),
        out_axes=out_axes,
        num_weights=math.prod(kernel.shape),
        macs=macs,
        input_shape=tuple(x.shape),
        output_shape=tuple(y.shape),
        num_activations=math.prod(x.shape) // batch,
    )


def trace_layer_calls(model: nn.Module, variables: Any, *args: Any, **kwargs: Any) -> list[dict[str, Any]]:
    """Runs `model.apply(variables, *args, **kwargs)` abstractly; one record per layer call, in call order."""
    records: list[dict[str, Any]] = []

    def interceptor(next_fun, call_args, call_kwargs, context):
        out = next_fun(*call_args, **call_kwargs)
        if context.method_name == "__call__" and layer_kind(context.module) is not None and call_args:
            records.append(_record(context.module, call_args[0], out))
        return out

    def run(variables):
        with nn.intercept_methods(interceptor):
            return model.apply(variables, *args, **kwargs)

    jax.eval_shape(run, variables)
    return records


def _check_not_scanned(records: list[dict[str, Any]], variables: Any) -> None:
    params = flatten_dict(dict(variables).get("params", {}), sep="/")
    for rec in records:
        stored = params.get(f"{rec['path']}/kernel")
        if stored is not None and tuple(np.shape(stored)) != rec["weight_shape"]:
            raise ValueError(
                f"layer {rec['path']!r} is stacked by nn.scan (stored kernel {tuple(np.shape(stored))}, "
                f"one call sees {rec['weight_shape']}); per-layer bit-widths need one module per layer: "
                "unstack the parameters with lampq_jax.models.convert.unstack_scanned and build the model "
                "with scan=False"
            )


def find_layers(
    model: nn.Module,
    variables: Any,
    *args: Any,
    rules: Sequence[TypeRule] = (),
    strict: bool = False,
    **apply_kwargs: Any,
) -> list[Layer]:
    """Finds every Dense / DenseGeneral / Conv / Einsum layer of `model`, in call order.

    Args:
      model: any flax.linen module; it is not changed.
      variables: its variables, e.g. `{"params": ...}`.
      *args: sample inputs for one forward pass (a batch of one is enough), e.g. images.
      rules: the user's (regex, type) rules, tried before the built-in ones.
      strict: raise instead of warning when some layers match no rule (type 'other').
      **apply_kwargs: passed to `model.apply`, e.g. `train=False`.

    Returns:
      One `Layer` per module; a module called several times is listed once with `calls` and
      summed `macs`.
    """
    compiled = check_rules(tuple(rules) + BUILTIN_RULES)
    records = trace_layer_calls(model, variables, *args, **apply_kwargs)
    if not records:
        raise ValueError(
            f"model {type(model).__name__} has no quantizable layer (nn.Dense, nn.DenseGeneral, nn.Conv, "
            "nn.Einsum) in its forward pass"
        )
    _check_not_scanned(records, variables)
    merged: dict[str, dict[str, Any]] = {}
    for rec in records:
        if rec["path"] in merged:
            merged[rec["path"]]["calls"] += 1
            merged[rec["path"]]["macs"] += rec["macs"]
        else:
            merged[rec["path"]] = {**rec, "calls": 1}
    layers = []
    for rec in merged.values():
        t = layer_type(rec["path"], compiled)
        layers.append(Layer(type=t, group=attention_group(rec["path"], t), **rec))
    untyped = [l.path for l in layers if not any(pattern.search(l.path) for pattern, _ in compiled)]
    if untyped:
        message = (
            f"{len(untyped)} layer(s) match no type rule and get type 'other': {untyped[:8]}"
            f"{' ...' if len(untyped) > 8 else ''}; pass rules=[(regex, type), ...] (to find_layers, quantize, "
            "quantize_uniform, metric_check, quantize_random; on the command line --type-rule 'REGEX=TYPE') "
            "with types in ('qkv', 'proj', 'fc1', 'fc2', 'embed', 'head') so the type-aware metric can tell "
            "them apart"
        )
        if strict:
            raise ValueError(message)
        warnings.warn(message, stacklevel=2)
    return layers


def layers_table(layers: Sequence[Layer]) -> str:
    """A plain-text table of layers: path, kind, type, group, weight shape, |W|, MACs."""
    width = max([len("path")] + [len(l.path) for l in layers])
    header = f"{'path':<{width}} {'kind':<13} {'type':<6} {'weight shape':<18} {'|W|':>10} {'MACs':>13}"
    rows = [header, "-" * len(header)]
    for l in layers:
        rows.append(
            f"{l.path:<{width}} {l.kind:<13} {l.type:<6} {str(l.weight_shape):<18} {l.num_weights:>10,} {l.macs:>13,}"
        )
    return "\n".join(rows)
