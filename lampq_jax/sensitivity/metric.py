"""Predicted loss increase and the type-aware metric (LampQ's I2, METHOD.md §4).

Predicted increase when layer i alone is quantized to b bits (Fisher for the Hessian, trace
approximation):

    ΔL̂_i(b) = ½ [ tr(F^W_i)/|W_i| · ‖Q_b(W_i) − W_i‖²  +  tr(F^A_i)/|A_i| · mean_n ‖Q_b(A_{i,n}) − A_{i,n}‖² ]

Type-aware metric Ω_i(b) = α_{t(i)} · ΔL̂_i(b), with α_t from `alpha_by_type`:
'probe' (measured increase / predicted increase over up to P layers of type t), 'mean'
(1 / mean tr(F^W) of the type), or 'none' (α = 1, the HAWQ-style metric).
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lampq_jax.apply.calibration import ActivationParams, batches
from lampq_jax.apply.fake import QuantPoint, activation_interceptor
from lampq_jax.apply.sites import site_interceptor
from lampq_jax.layers.discovery import Layer
from lampq_jax.quant import UniformParams, fake_quant, quant_errors, weight_reduce_axes
from lampq_jax.sensitivity.fisher import FisherTraces

ALPHA_MODES = ("probe", "mean", "none")


def weight_errors(variables: Any, layers: Sequence[Layer], candidates: Sequence[int]) -> np.ndarray:
    """[layers, candidates] ‖Q_b(W_i) − W_i‖², per output channel with the clipping search."""
    from flax.traverse_util import flatten_dict

    flat = flatten_dict(dict(variables)["params"], sep="/")
    rows = []
    for layer in layers:
        kernel = flat[f"{layer.path}/kernel"]
        axes = weight_reduce_axes(kernel.ndim, layer.out_axes)
        rows.append(np.asarray(quant_errors(kernel, tuple(candidates), reduce_axes=axes)))
    return np.stack(rows)


def activation_errors(
    model: nn.Module,
    variables: Any,
    images: np.ndarray,
    layers: Sequence[Layer],
    act_params: ActivationParams,
    candidates: Sequence[int],
    *,
    batch_size: int = 32,
    quant: Optional[QuantPoint] = None,
    **apply_kwargs: Any,
) -> np.ndarray:
    """[layers, candidates] mean_n ‖Q_b(A_{i,n}) − A_{i,n}‖² with the calibrated quantizers.

    With `quant` (a `QuantPoint`), the inputs A_{i,n} are those of the quantized model.
    """
    paths = [l.path for l in layers]
    missing = [p for p in paths if p not in act_params]
    if missing:
        raise ValueError(f"no calibrated activation range for layer(s) {missing[:5]}")
    run_vars = quant.variables if quant else variables

    @jax.jit
    def batch_errors(variables, batch):
        found = {}

        def on_site(site, x):
            table = jnp.asarray(act_params[site])
            errs = []
            for b in candidates:
                xq = fake_quant(x, UniformParams(table[b, 0], table[b, 1]), b)
                errs.append(jnp.sum(jnp.square(xq - x).astype(jnp.float32)))
            found[site] = jnp.stack(errs)
            return x

        with nn.intercept_methods(site_interceptor(on_site, layer_paths=frozenset(paths), attention_paths=frozenset())):
            if quant:
                with nn.intercept_methods(activation_interceptor(quant.spec, quant.act_params)):
                    model.apply(variables, batch, **apply_kwargs)
            else:
                model.apply(variables, batch, **apply_kwargs)
        return found

    total = {p: np.zeros(len(candidates)) for p in paths}
    for batch in batches(images, batch_size):
        for site, errs in jax.device_get(batch_errors(run_vars, batch)).items():
            total[site] += errs
    return np.stack([total[p] / images.shape[0] for p in paths])


def predicted_increase(
    fisher: FisherTraces, layers: Sequence[Layer], w_err: np.ndarray, a_err: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The weight and activation halves of ΔL̂_i(b), each [layers, candidates]; ΔL̂ is their sum."""
    trw = np.array([fisher.weight[l.path] / l.num_weights for l in layers])[:, None]
    tra = np.array([fisher.activation[l.path] / l.num_activations for l in layers])[:, None]
    return 0.5 * trw * w_err, 0.5 * tra * a_err


def probe_indices(count: int, probes: int) -> list[int]:
    """Up to `probes` indices of `count` items spread evenly over depth (first and last included)."""
    if count <= probes:
        return list(range(count))
    return sorted(set(np.linspace(0, count - 1, probes).round().astype(int).tolist()))


def alpha_by_type(
    mode: str,
    types: Sequence[str],
    predicted_low: np.ndarray,
    *,
    fisher_weight: Optional[np.ndarray] = None,
    measured_low: Optional[Mapping[int, float]] = None,
    floor: float = 1e-12,
) -> dict[str, float]:
    """α_t per type.

    Args:
      mode: 'probe', 'mean' or 'none'.
      types: type of each item (layer or group).
      predicted_low: [items] ΔL̂ at the lowest candidate.
      fisher_weight: [items] tr(F^W) (mode 'mean').
      measured_low: {item index: measured ΔL at the lowest candidate} (mode 'probe').

    Formulas: probe α_t = Σ_{i∈P_t} ΔL_i / Σ_{i∈P_t} ΔL̂_i; mean α_t = 1 / mean_{i∈t} tr(F^W_i); none α_t = 1.
    """
    if mode not in ALPHA_MODES:
        raise ValueError(f"alpha mode must be one of {ALPHA_MODES}, got {mode!r}")
    alpha = {}
    for t in sorted(set(types)):
        members = [i for i, ti in enumerate(types) if ti == t]
        if mode == "none":
            alpha[t] = 1.0
        elif mode == "mean":
            alpha[t] = 1.0 / max(float(np.mean(fisher_weight[members])), floor)
        else:
            probed = [i for i in members if i in measured_low]
            if not probed:
                raise ValueError(f"alpha mode 'probe' has no measured layer of type {t!r}")
            measured = sum(max(measured_low[i], 0.0) for i in probed)
            alpha[t] = max(measured, floor) / max(float(np.sum(predicted_low[probed])), floor)
    return alpha


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman rank correlation (average ranks for ties) of two equal-length sequences."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape or a.ndim != 1 or a.size < 2:
        raise ValueError(f"spearman needs two 1-D sequences of equal length >= 2, got {a.shape} and {b.shape}")

    def ranks(x):
        order = np.argsort(x, kind="stable")
        r = np.empty(len(x))
        r[order] = np.arange(len(x), dtype=np.float64)
        for value in np.unique(x):
            tie = x == value
            r[tie] = r[tie].mean()
        return r

    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = np.sqrt((ra**2).sum() * (rb**2).sum())
    return float((ra * rb).sum() / denom) if denom > 0 else 0.0
