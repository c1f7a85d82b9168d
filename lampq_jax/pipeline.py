"""The method, stage by stage: discovery → calibration → (Fisher → α → ILP → updates) → quantized model."""

from __future__ import annotations

import time
from typing import Any, Optional

import flax.linen as nn

from lampq_jax.apply import QuantizedModel, QuantSpec, calibrate_activations, check_images, find_attention_paths
from lampq_jax.layers import find_layers
from lampq_jax.quant import check_bits
from lampq_jax.result import QuantizationResult

FIXED_TYPES_DEFAULT = ("embed", "head")


def quantize_uniform(
    model: nn.Module,
    variables: Any,
    calib_images: Any,
    bits: int,
    *,
    fixed_bits: int = 8,
    fixed_types: tuple[str, ...] = FIXED_TYPES_DEFAULT,
    attn_bits: Optional[int] = None,
    calibration: str = "mse",
    batch_size: int = 32,
    **apply_kwargs: Any,
) -> QuantizationResult:
    """Quantizes every layer at W`bits`A`bits` (embed and head at `fixed_bits`): the uniform baseline.

    Args:
      model, variables: an unchanged flax.linen model and its variables.
      calib_images: calibration inputs [N, ...], finite.
      bits: weight and activation bits of every allocated layer, in [2, 8].
      fixed_bits: bits of the layers whose type is in `fixed_types`.
      attn_bits: bits of the attention matmul inputs (default: `bits`).
      calibration: activation range method, 'mse', 'percentile' or 'minmax'.
      **apply_kwargs: passed to `model.apply`, e.g. `train=False`.
    """
    check_bits(bits), check_bits(fixed_bits)
    attn_bits = bits if attn_bits is None else check_bits(attn_bits)
    images = check_images(calib_images)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    layers = find_layers(model, variables, images[:1], **apply_kwargs)
    attention = find_attention_paths(model, variables, images[:1], **apply_kwargs)
    timings["discovery"] = time.perf_counter() - start
    start = time.perf_counter()
    act_params = calibrate_activations(model, variables, images, method=calibration, batch_size=batch_size,
                                       **apply_kwargs)
    timings["calibration"] = time.perf_counter() - start
    layer_bits = {l.path: (fixed_bits, fixed_bits) if l.type in fixed_types else (bits, bits) for l in layers}
    spec = QuantSpec.build(layers, layer_bits, attention_bits={p: attn_bits for p in attention})
    start = time.perf_counter()
    quantized = QuantizedModel.create(model, variables, layers, spec, act_params, apply_kwargs)
    timings["quantize_weights"] = time.perf_counter() - start
    report = {"method": "uniform", "bits": bits, "attn_bits": attn_bits, "num_layers": len(layers)}
    return QuantizationResult(quantized=quantized, method="uniform", report=report, timings=timings)
