"""A quantized view of an unchanged flax.linen model: fake-quantized weights + activation interceptor."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Optional, Sequence

import flax.linen as nn
import jax

from lampq_jax.apply.calibration import ActivationParams
from lampq_jax.apply.fake import QuantSpec, activation_interceptor, fake_quantize_params
from lampq_jax.layers.discovery import Layer


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
    """

    model: nn.Module
    layers: Sequence[Layer]
    spec: QuantSpec
    variables: Any
    act_params: ActivationParams
    apply_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    _compiled: dict[tuple, Callable[..., Any]] = dataclasses.field(default_factory=dict, repr=False)

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
    ) -> "QuantizedModel":
        """Fake-quantizes the kernels of `spec` once (GPTQ for the layers in `hessians`) and returns the model."""
        qvars = fake_quantize_params(variables, layers, spec, hessians=hessians)
        return cls(model, tuple(layers), spec, qvars, act_params, dict(apply_kwargs))

    def _fn(self, frozen_kwargs: tuple) -> Callable[..., Any]:
        if frozen_kwargs not in self._compiled:
            kwargs = dict(frozen_kwargs)
            interceptor = activation_interceptor(self.spec, self.act_params)

            def run(variables, *args):
                with nn.intercept_methods(interceptor):
                    return self.model.apply(variables, *args, **kwargs)

            self._compiled[frozen_kwargs] = jax.jit(run)
        return self._compiled[frozen_kwargs]

    def apply(self, *args: Any, **kwargs: Any) -> Any:
        """Runs the quantized model (jitted, traced once per input shape and keyword set).

        Keyword arguments override the `apply_kwargs` given at quantization time.
        """
        frozen = freeze_apply_kwargs({**self.apply_kwargs, **kwargs})
        return self._fn(frozen)(self.variables, *args)

    @property
    def bits(self) -> dict[str, tuple[int, int]]:
        """{layer path: (weight bits, activation bits)}."""
        return self.spec.bits
