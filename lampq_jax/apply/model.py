"""A quantized view of an unchanged flax.linen model: fake-quantized weights + activation interceptor."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Optional, Sequence

import flax.linen as nn
import jax

from lampq_jax.apply.calibration import ActivationParams
from lampq_jax.apply.fake import (
    QuantSpec,
    activation_interceptor,
    quantize_weights,
    with_weights,
)
from lampq_jax.layers.discovery import Layer
from lampq_jax.quant.qtensor import QuantizedTensor, container_bits


def freeze_apply_kwargs(kwargs: dict[str, Any]) -> tuple:
    """`kwargs` as sorted (name, value) pairs, hashable for a static `jit` argument; TypeError if a value is not."""
    try:
        frozen = tuple(sorted(kwargs.items()))
        hash(frozen)
    except TypeError:
        raise TypeError(
            f"apply keyword arguments must be hashable (they are static under jit), got {sorted(kwargs)}"
        ) from None
    return frozen


def jitted_apply(model: nn.Module, make_interceptor: Callable[[Any], Callable[..., Any]]) -> Callable[..., Any]:
    """The one jitted forward of a quantized model, fake or integer:

        run(variables, state, *args, kwargs) = model.apply(variables, *args, **dict(kwargs))
                                               under nn.intercept_methods(make_interceptor(state))

    `state` is a pytree (traced: e.g. packed weights), `kwargs` sorted (name, value) pairs (static,
    `freeze_apply_kwargs`). It compiles once per input shape and keyword set; its owner keeps it, so no
    module-level cache holds the model.
    """

    def run(variables, state, *args, kwargs):
        with nn.intercept_methods(make_interceptor(state)):
            return model.apply(variables, *args, **dict(kwargs))

    return jax.jit(run, static_argnames="kwargs")


@dataclasses.dataclass(eq=False)
class QuantizedModel:
    """`model` run with `spec`'s fake quantization.

    Attributes:
      model: the unchanged flax.linen module.
      layers: its layers (from `find_layers`).
      spec: bits per layer and attention.
      variables: the variables with fake-quantized kernels (computed once).
      act_params: calibrated activation quantizers per site.
      apply_kwargs: default keyword arguments of `apply`, e.g. {'train': False}.
      weights: {layer path: QuantizedTensor}, the codes and grid of every quantized kernel; the kernels
        in `variables` are their `dequantize`. Export and QAT read them; empty for a model built by hand.
    """

    model: nn.Module
    layers: Sequence[Layer]
    spec: QuantSpec
    variables: Any
    act_params: ActivationParams
    apply_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    weights: Mapping[str, QuantizedTensor] = dataclasses.field(default_factory=dict)
    _run: Callable[..., Any] = dataclasses.field(init=False, repr=False)

    def __post_init__(self):
        self._run = jitted_apply(self.model, lambda _: activation_interceptor(self.spec, self.act_params))

    @classmethod
    def create(
        cls,
        model: nn.Module,
        variables: Any,
        layers: Sequence[Layer],
        spec: QuantSpec,
        act_params: ActivationParams,
        apply_kwargs: dict[str, Any],
        *,
        hessians: Optional[Mapping[str, Any]] = None,
        weights: Optional[Mapping[str, QuantizedTensor]] = None,
    ) -> "QuantizedModel":
        """Quantizes the kernels of `spec` once (GPTQ for the layers in `hessians`) and returns the model, whose
        variables hold the dequantized kernels. `weights` {path: QuantizedTensor}: the codes of `spec`'s layers,
        already made as `quantize_weights` makes them (`DynamicQuantizer.weights`), instead of quantizing again.

        Raises:
          ValueError: `weights` that do not cover `spec`'s layers at their bits, named.
        """
        if weights is None:
            weights = quantize_weights(variables, layers, spec, hessians=hessians)
        wrong = [p for p, wb, _ in spec.layers if p not in weights or weights[p].bits != container_bits(wb)]
        wrong += sorted(set(weights) - {p for p, _, _ in spec.layers})  # layers the spec does not quantize
        if wrong:
            raise ValueError(f"weights do not match the spec's layers and bits: {wrong[:5]}")
        qvars = with_weights(variables, layers, weights)
        return cls(model, tuple(layers), spec, qvars, act_params, dict(apply_kwargs), weights)

    def apply(self, *args: Any, **kwargs: Any) -> Any:
        """Runs the quantized model (jitted, traced once per input shape and keyword set).

        Keyword arguments override the `apply_kwargs` given at quantization time.
        """
        return self._run(self.variables, None, *args, kwargs=freeze_apply_kwargs({**self.apply_kwargs, **kwargs}))

    @property
    def bits(self) -> dict[str, tuple[int, int]]:
        """{layer path: (weight bits, activation bits)}."""
        return self.spec.bits
