"""The baselines of METHOD.md §10 as configurations of the same machinery.

uniform         `quantize_uniform(..., bits)`
hawq            HAWQ-V3 style: α = none (trace-weighted Fisher), no iterations (K = 0)
vtptq           VT-PTQ style: one bit-width per attention / MLP module, nuclear-norm metric
random          random assignments that meet the same budget (`quantize_random`)
no_i1 / no_i2 / no_i3   LampQ without per-layer granularity / the type-aware α / the iterations

The peer baselines (hawq, vtptq, random) return their own allocation (`keep_uniform=False`) and choose nothing by
J, so they calibrate on every image (`holdout=0` whatever the base config says); LampQ and its ablations keep
the uniform assignment when it measures better (`LampQConfig.keep_uniform`; on held-out images with
`LampQConfig.holdout`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import flax.linen as nn

from lampq_jax.config import LampQConfig
from lampq_jax.layers import TypeRule
from lampq_jax.pipeline import checked_rules, quantize
from lampq_jax.result import QuantizationResult

ABLATIONS: dict[str, dict[str, Any]] = {
    "lampq": {},
    "hawq": {"alpha": "none", "iterations": 0, "keep_uniform": False, "holdout": 0.0},
    "vtptq": {
        "metric": "vtptq",
        "granularity": "module",
        "alpha": "none",
        "iterations": 0,
        "keep_uniform": False,
        "holdout": 0.0,
    },
    "no_i1": {"granularity": "module"},
    "no_i2": {"alpha": "none"},
    "no_i3": {"iterations": 0},
}


def baseline_config(name: str, base: LampQConfig = LampQConfig()) -> LampQConfig:
    """`base` with the fields of baseline / ablation `name` ('lampq', 'hawq', 'vtptq', 'no_i1', 'no_i2', 'no_i3')."""
    if name not in ABLATIONS:
        raise ValueError(f"unknown baseline {name!r}; choose one of {sorted(ABLATIONS)} (or quantize_random)")
    return dataclasses.replace(base, **ABLATIONS[name])


def quantize_random(
    model: nn.Module,
    variables: Any,
    calib_images: Any,
    *,
    budget: float,
    seed: int = 0,
    config: LampQConfig = LampQConfig(),
    rules: Sequence[TypeRule] = (),
    **apply_kwargs: Any,
) -> QuantizationResult:
    """A random mixed-precision assignment that meets the same budget (same quantizers and calibration).

    `rules`: the user's (regex, type) rules for the layer types, as in `quantize`.
    """
    rules = checked_rules(rules)
    return quantize(
        model,
        variables,
        calib_images,
        budget=budget,
        config=dataclasses.replace(
            config,
            metric="random",
            iterations=0,
            alpha="none",
            seed=seed,
            metric_check=False,
            keep_uniform=False,
            holdout=0.0,
        ),
        rules=rules,
        **apply_kwargs,
    )
