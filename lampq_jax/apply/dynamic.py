"""Fake quantization with bit-widths as traced values: one compilation for every assignment.

The allocation search runs the model under many assignments (single-layer probes, each ILP
round). `DynamicQuantizer.apply` takes the bits of every site as int32 arrays (0 = not
quantized) and kernels quantized on the host side per (layer, bits) and cached, so changing
the assignment never retraces. The static path (`QuantizedModel`) is used for the final model.

    uniform:  x̂ = (clip(round(x / s) + z, 0, 2^b − 1) − z) · s,  (s, z) = table[b]
    softmax:  code = round(−k log2 w), x̂ = 2^(−code / k) if code ≤ 2^b − 1 else 0   (`softmax_dynamic`)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, NamedTuple, Optional, Sequence

import flax.linen as nn
import jax
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from lampq_jax.apply.calibration import ActivationParams
from lampq_jax.apply.compiled import compiled
from lampq_jax.apply.fake import QuantPoint, QuantSpec, quantize_layer
from lampq_jax.apply.prefix import skipping_interceptor
from lampq_jax.apply.sites import site_interceptor
from lampq_jax.apply.static import static_module
from lampq_jax.quant.traced import fake_quant_dynamic, softmax_dynamic
from lampq_jax.layers.discovery import Layer
from lampq_jax.quant.qtensor import QuantizedTensor


class DynamicBits(NamedTuple):
    """Traced quantization state of a model run: bits per site (0: float) and the calibrated tables.

    Attributes:
      tables: {site: [MAX_BITS + 1, 2] (scale, zero_point)}.
      site_bits: {site: int32 []}, the bits of each activation site.
      softmax_bits: {attention path: int32 []}, the bits of each softmax output.
    """

    tables: dict[str, jax.Array]
    site_bits: dict[str, jax.Array]
    softmax_bits: dict[str, jax.Array]


def dynamic_bits(
    act_params: ActivationParams,
    attention: Sequence[str],
    bits: Mapping[str, tuple[int, int]],
    attention_bits: Optional[Mapping[str, int]] = None,
) -> DynamicBits:
    """`DynamicBits` for an assignment {path: (weight bits, act bits)}; sites not in it stay float."""
    attention_bits = attention_bits or {}
    site_bits = {s: np.int32(0) for s in act_params}
    for path, (_, ab) in bits.items():
        if path in site_bits:
            site_bits[path] = np.int32(ab)
    for path, b in attention_bits.items():
        for s in "qkv":
            site_bits[f"{path}/{s}"] = np.int32(b)
    softmax_bits = {p: np.int32(attention_bits.get(p, 0)) for p in attention}
    return DynamicBits({s: np.asarray(t) for s, t in act_params.items()}, site_bits, softmax_bits)


def dynamic_interceptor(state: DynamicBits, *, ste: bool = False, on_input=None):
    """Interceptor quantizing every site at its traced bits; `on_input(site, x)` runs first on each input."""

    def on_site(site, x):
        if on_input is not None:
            x = on_input(site, x)
        if site in state.site_bits:
            x = fake_quant_dynamic(x, state.tables[site], state.site_bits[site], ste=ste)
        return x

    def on_softmax(path, weights):
        return softmax_dynamic(weights, state.softmax_bits[path], ste=ste) if path in state.softmax_bits else weights

    return site_interceptor(on_site, on_softmax=on_softmax)


def _dynamic_forward(variables, state: DynamicBits, x, *, model: nn.Module, kwargs: tuple):
    with nn.intercept_methods(dynamic_interceptor(state)):
        return model.apply(variables, x, **dict(kwargs))


def dynamic_forward(model: nn.Module, kwargs: tuple):
    """The jitted `(variables, state, x) → model.apply(variables, x, **dict(kwargs))` with the bits of `state`,
    one per model and keyword set (`compiled`): the bits are traced, so a new assignment does not compile again."""
    return compiled(_dynamic_forward, static_module(model), kwargs)


def _skipping_forward(variables, state: DynamicBits, skips, cached, x, *, model: nn.Module, kwargs: tuple):
    record: dict[str, Any] = {}
    with nn.intercept_methods(skipping_interceptor(dynamic_interceptor(state), skips, cached, record)):
        return model.apply(variables, x, **dict(kwargs)), record


def dynamic_apply(variables, state: DynamicBits, x, *, model: nn.Module, kwargs: tuple):
    """`dynamic_forward(model, kwargs)(variables, state, x)`."""
    return dynamic_forward(model, kwargs)(variables, state, x)


@dataclasses.dataclass(eq=False)
class DynamicQuantizer:
    """Runs `model` under any assignment of bits without recompiling.

    Attributes:
      model, variables: the unchanged model and its full-precision variables.
      layers: its layers; attention: its attention module paths.
      act_params: calibrated activation quantizers per site.
      apply_kwargs: keyword arguments of `model.apply`.
      weight_grid: clipping-search grid of the weights (None: default).
      hessians: {path: [in, in]} of the layers whose weights get GPTQ codes (the others: RTN).

    Each (layer, bit-width) is quantized once and kept packed (`tensor`): at most 7 tensors per layer (2–8
    bits), packed in Σ_b container_bits(b) / 32 ≈ 1.1× the float kernels if every width is used, plus the
    grids; the cache goes with the quantizer.
    The forward is `dynamic_forward`, compiled once per model (`apply.compiled`).
    """

    model: nn.Module
    variables: Any
    layers: Sequence[Layer]
    attention: Sequence[str]
    act_params: ActivationParams
    apply_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    weight_grid: Optional[tuple[float, ...]] = None
    hessians: Optional[Mapping[str, Any]] = None
    _tensors: dict[tuple[str, int], QuantizedTensor] = dataclasses.field(default_factory=dict, repr=False)

    def __post_init__(self):
        self._flat = flatten_dict(dict(self.variables)["params"], sep="/")
        self._out_axes = {l.path: tuple(l.out_axes) for l in self.layers}
        self._kwargs = tuple(sorted(self.apply_kwargs.items()))
        self._static_model = static_module(self.model)

    def tensor(self, path: str, bits: int) -> QuantizedTensor:
        """The packed codes and grid of layer `path`'s kernel at `bits` (`quantize_layer`), cached."""
        key = (path, int(bits))
        if key not in self._tensors:
            self._tensors[key] = quantize_layer(
                self._flat[f"{path}/kernel"],
                int(bits),
                self._out_axes[path],
                grid=self.weight_grid,
                hessian=(self.hessians or {}).get(path),
            )
        return self._tensors[key]

    def kernel(self, path: str, bits: int) -> jax.Array:
        """The kernel of layer `path` fake-quantized at `bits` (0: full precision), from the cached codes."""
        return self._flat[f"{path}/kernel"] if bits == 0 else self.tensor(path, bits).kernel(self._out_axes[path])

    def weights(self, weight_bits: Mapping[str, int]) -> dict[str, QuantizedTensor]:
        """{path: QuantizedTensor} of `weight_bits` {path: bits ≥ 2}, as `quantize_weights` makes them."""
        return {path: self.tensor(path, bits) for path, bits in weight_bits.items()}

    def params(self, weight_bits: Mapping[str, int]) -> Any:
        """Params with the kernels of `weight_bits` {path: bits} quantized (others full precision)."""
        flat = dict(self._flat)
        for path, bits in weight_bits.items():
            flat[f"{path}/kernel"] = self.kernel(path, bits)
        return unflatten_dict(flat, sep="/")

    def point(
        self, bits: Mapping[str, tuple[int, int]], attention_bits: Optional[Mapping[str, int]] = None
    ) -> QuantPoint:
        """The `QuantPoint` of `bits` {path: (weight bits, act bits)}, its kernels from the cache.

        The same point as `quant_point(variables, layers, spec, act_params, hessians=hessians)`, without
        quantizing again the kernels that an earlier `apply` already did.
        """
        spec = QuantSpec.build(self.layers, bits, attention_bits=attention_bits, weight_grid=self.weight_grid)
        params = self.params({path: wb for path, wb, _ in spec.layers})
        return QuantPoint(spec, self.act_params, {**dict(self.variables), "params": params})

    def apply(
        self,
        x: jax.Array,
        bits: Mapping[str, tuple[int, int]],
        attention_bits: Optional[Mapping[str, int]] = None,
    ) -> jax.Array:
        """Model output on `x` with `bits` {path: (weight bits, act bits)}; absent layers stay float."""
        unknown = sorted(set(bits) - set(self._out_axes))
        if unknown:
            raise ValueError(f"unknown layer path(s) {unknown[:5]}")
        variables, state = self._run_state(bits, attention_bits)
        return dynamic_apply(variables, state, x, model=self._static_model, kwargs=self._kwargs)

    def _run_state(self, bits, attention_bits) -> tuple[Any, DynamicBits]:
        """(variables with the kernels of `bits` quantized, the traced bits of `bits` and `attention_bits`)."""
        variables = {**dict(self.variables), "params": self.params({p: wb for p, (wb, _) in bits.items()})}
        return variables, dynamic_bits(self.act_params, self.attention, bits, attention_bits)

    def apply_skipping(
        self,
        x: jax.Array,
        bits: Mapping[str, tuple[int, int]],
        attention_bits: Optional[Mapping[str, int]],
        skips: Mapping[str, bool],
        cached: Mapping[str, Any],
    ) -> tuple[jax.Array, dict[str, Any]]:
        """(`apply`'s output, {cut module: its output}) with each cut module in `skips` replaced by `cached[path]`
        where its flag is set (`prefix.skipping_interceptor`); the flags are traced, so one compilation serves all."""
        variables, state = self._run_state(bits, attention_bits)
        flags = {path: np.bool_(skip) for path, skip in skips.items()}
        forward = compiled(_skipping_forward, self._static_model, self._kwargs)
        return forward(variables, state, flags, dict(cached), x)
