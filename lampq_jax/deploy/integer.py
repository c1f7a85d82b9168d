"""Integer inference: the quantized Dense / DenseGeneral layers run on packed low-bit weights.

The model is unchanged; an interceptor (`nn.intercept_methods`) replaces the call of every
exported Dense / DenseGeneral layer by

    y = weight_only_matmul(Q_a(x) [M, K], W [K, N]) + b          (M = rows of x, K, N: the layer's)

where W is the layer's `QuantizedTensor` (packed codes, per-channel scale and zero point, from
`lampq_jax.deploy.export.export_result`), Q_a the layer's input quantizer at its activation bits (as in
the fake-quantized model) and b its float bias. The Pallas kernel unpacks the codes itself
(interpret mode on CPU). The float kernels of these layers are not read: they are removed from
the variables the model runs with. Everything else follows the fake-quantized model exactly:
Conv and Einsum layers (e.g. the patch embedding) run their fake-quantized kernels with quantized
inputs, and attention quantizes q, k, v and the softmax output (`activation_interceptor`).
So the outputs equal `result.apply(x)` up to float rounding of the matmuls.

Example:
    >>> tensors = result.export()
    >>> logits = integer_apply(result, tensors, images)          # ≈ result.apply(images)
    >>> model = IntegerModel(result, tensors); model.apply(images)  # jitted, reusable
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from lampq_jax.apply.calibration import ActivationParams
from lampq_jax.apply.fake import QuantSpec, activation_interceptor
from lampq_jax.apply.model import freeze_apply_kwargs, jitted_apply
from lampq_jax.kernels.tiling import BlockSizes
from lampq_jax.kernels.weight_only_matmul import weight_only_matmul
from lampq_jax.layers.discovery import module_path
from lampq_jax.quant import UniformParams, fake_quant
from lampq_jax.quant.qtensor import QuantizedTensor

_KERNEL_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))


def _is_dense(module: nn.Module) -> bool:
    return isinstance(module, (nn.Dense, nn.DenseGeneral))


def integer_dense(
    module: nn.Module,
    x: jax.Array,
    tensor: QuantizedTensor,
    *,
    block_sizes: Optional[BlockSizes] = None,
    interpret: Optional[bool] = None,
) -> jax.Array:
    """A bound nn.Dense / nn.DenseGeneral applied to `x` with its packed weight `tensor`.

    Contracts the module's `axis` (Dense: the last) of `x` with the tensor's K rows:

        y[..., features] = (x with the contracted axes moved last, as [M, K]) @ W [K, N] + bias

    Args:
      module: the bound layer (for `axis`, `features`, `use_bias`, `dtype` and its bias).
      x: its input, already quantized.
      tensor: `QuantizedTensor` of its kernel, [K, N] = [prod(contracted dims), prod(features)].

    Raises:
      ValueError: a DenseGeneral with `batch_dims`, or a tensor whose [K, N] does not match the
        layer's (the message gives both).
    """
    path = module_path(module)
    if isinstance(module, nn.DenseGeneral):
        if tuple(np.atleast_1d(module.batch_dims)):
            raise ValueError(f"layer {path!r}: DenseGeneral with batch_dims={module.batch_dims} has no integer path")
        axis = tuple(int(a) % x.ndim for a in np.atleast_1d(module.axis))
        features = tuple(int(f) for f in np.atleast_1d(module.features))
    else:
        axis, features = (x.ndim - 1,), (int(module.features),)
    rest = tuple(a for a in range(x.ndim) if a not in axis)
    k = math.prod(x.shape[a] for a in axis)
    n = math.prod(features)
    if tensor.matrix_shape != (k, n):
        raise ValueError(
            f"layer {path!r}: the exported tensor is [K, N] = {list(tensor.matrix_shape)} but the layer "
            f"maps input {x.shape} over axes {axis} to features {features}, i.e. [{k}, {n}]"
        )
    dtype = jnp.dtype(module.dtype) if module.dtype is not None else jnp.result_type(x.dtype, tensor.dtype)
    compute = dtype if dtype in _KERNEL_DTYPES else jnp.dtype(jnp.float32)
    x2 = jnp.transpose(x, rest + axis).reshape(-1, k).astype(compute)
    y = weight_only_matmul(x2, tensor, block_sizes=block_sizes, interpret=interpret, out_dtype=compute)
    if module.use_bias:
        y = y + jnp.asarray(module.get_variable("params", "bias"), compute).reshape(1, n)
    return y.reshape(tuple(x.shape[a] for a in rest) + features).astype(dtype)


def integer_interceptor(
    spec: QuantSpec,
    act_params: ActivationParams,
    tensors: Mapping[str, QuantizedTensor],
    *,
    block_sizes: Optional[BlockSizes] = None,
    interpret: Optional[bool] = None,
) -> Callable[..., Any]:
    """Interceptor for `nn.intercept_methods`: exported Dense / DenseGeneral layers on packed weights.

    A layer whose path is in `tensors` and in `spec` gets its input fake-quantized at its
    activation bits and runs through `integer_dense`; every other call goes to
    `activation_interceptor(spec, act_params)` (fake-quantized Conv / Einsum inputs, attention).
    """
    act_bits = {p: ab for p, _, ab in spec.layers}
    missing = sorted(p for p in tensors if p not in act_bits)
    if missing:
        raise ValueError(f"exported layer(s) {missing[:5]} are not quantized layers of the spec")
    fallback = activation_interceptor(spec, act_params)

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name == "__call__" and args and _is_dense(module):
            path = module_path(module)
            if path in tensors:
                bits = act_bits[path]
                table = jnp.asarray(act_params[path])
                x = fake_quant(args[0], UniformParams(scale=table[bits, 0], zero_point=table[bits, 1]), bits)
                return integer_dense(module, x, tensors[path], block_sizes=block_sizes, interpret=interpret)
        return fallback(next_fun, args, kwargs, context)

    return interceptor


def _without_kernels(variables: Any, paths) -> Any:
    """`variables` without 'params/<path>/kernel' for each path (the integer path never reads them)."""
    flat = flatten_dict(dict(variables)["params"], sep="/")
    for path in paths:
        flat.pop(f"{path}/kernel", None)
    return {**dict(variables), "params": unflatten_dict(flat, sep="/")}


@dataclasses.dataclass(eq=False)
class IntegerModel:
    """A quantization result run with its exported packed weights (module docstring).

    Attributes:
      result: the `QuantizationResult` (model, spec, activation quantizers, other variables).
      tensors: {layer path: QuantizedTensor} from `export_result` (or `load_export`).
      block_sizes: tiles of `weight_only_matmul` (default: the backend's).
      interpret: Pallas interpret mode (default: True on CPU).
    """

    result: Any
    tensors: Mapping[str, QuantizedTensor]
    block_sizes: Optional[BlockSizes] = None
    interpret: Optional[bool] = None
    _variables: Any = dataclasses.field(init=False, repr=False)
    _run: Callable[..., Any] = dataclasses.field(init=False, repr=False)

    def __post_init__(self):
        quantized = self.result.quantized
        kinds = {l.path: l.kind for l in quantized.layers}
        unknown = sorted(p for p in self.tensors if p not in quantized.spec.bits)
        if unknown:
            raise ValueError(
                f"tensors {unknown[:5]} are not quantized layers of the result "
                f"(its layers are e.g. {sorted(quantized.spec.bits)[:5]})"
            )
        for path, tensor in self.tensors.items():
            if not isinstance(tensor, QuantizedTensor):
                raise TypeError(f"tensors[{path!r}] must be a QuantizedTensor, got {type(tensor).__name__}")
        # Only Dense / DenseGeneral layers run on packed weights; the others keep their
        # fake-quantized kernels.
        self.tensors = {p: t for p, t in self.tensors.items() if kinds[p] in ("dense", "dense_general")}
        self._variables = _without_kernels(quantized.variables, self.tensors)
        options = {"block_sizes": self.block_sizes, "interpret": self.interpret}
        self._run = jitted_apply(
            quantized.model,
            lambda tensors: integer_interceptor(quantized.spec, quantized.act_params, tensors, **options),
        )

    @property
    def integer_layers(self) -> list[str]:
        """Paths of the layers that run on packed weights."""
        return list(self.tensors)

    def apply(self, *args: Any, **kwargs: Any) -> Any:
        """Runs the model (jitted once per input shape and keyword set); kwargs override the result's."""
        frozen = freeze_apply_kwargs({**self.result.quantized.apply_kwargs, **kwargs})
        return self._run(self._variables, dict(self.tensors), *args, kwargs=frozen)


def integer_apply(result: Any, tensors: Mapping[str, QuantizedTensor], *args: Any, **kwargs: Any) -> Any:
    """`IntegerModel(result, tensors).apply(*args, **kwargs)`; keep an `IntegerModel` to reuse its compilation."""
    return IntegerModel(result, tensors).apply(*args, **kwargs)


__all__ = ["IntegerModel", "integer_apply", "integer_dense", "integer_interceptor"]
