"""Predicted loss increase and the type-aware metric (LampQ's I2, METHOD.md §4).

Predicted increase when layer i alone is quantized to b bits (Fisher for the Hessian, trace
approximation):

    ΔL̂_i(b) = ½ [ tr(F^W_i)/|W_i| · ‖Q_b(W_i) − W_i‖²  +  tr(F^A_i)/|A_i| · mean_n ‖Q_b(A_{i,n}) − A_{i,n}‖² ]

Type-aware metric Ω_i(b) = α_{t(i)} · ΔL̂_i(b), with α_t from `alpha_by_type`:
'probe' (measured increase / predicted increase over up to P layers of type t), 'mean'
(1 / mean tr(F^W) of the type), or 'none' (α = 1, the HAWQ-style metric). The 'layer' mode
(`alpha_by_unit`) measures every unit and scales each one alone: Ω_i(b) = α_i · ΔL̂_i(b).
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import flax.linen as nn
import numpy as np
from jax.sharding import Mesh

from lampq_jax.apply.calibration import ActivationParams, input_errors, per_batch
from lampq_jax.apply.dynamic import DynamicBits, dynamic_bits, dynamic_interceptor
from lampq_jax.apply.fake import QuantPoint, layer_kernels
from lampq_jax.layers.discovery import Layer
from lampq_jax.quant import quant_errors, weight_reduce_axes
from lampq_jax.sensitivity.fisher import FisherTraces

TYPE_ALPHA_MODES = ("probe", "mean", "none")


def weight_errors(variables: Any, layers: Sequence[Layer], candidates: Sequence[int]) -> np.ndarray:
    """[layers, candidates] ‖Q_b(W_i) − W_i‖², per output channel with the clipping search."""
    kernels = layer_kernels(variables, [l.path for l in layers])
    rows = []
    for layer in layers:
        kernel = kernels[layer.path]
        axes = weight_reduce_axes(kernel.ndim, layer.out_axes)
        rows.append(np.asarray(quant_errors(kernel, tuple(candidates), reduce_axes=axes)))
    return np.stack(rows)


def _batch_activation_errors(variables, tables, state: DynamicBits, batch, *, model, kwargs, paths, candidates):
    """{path: [batch, candidates] ‖Q_b(A_{i,n}) − A_{i,n}‖² per image n} of one batch; compiled once per model."""
    found = {}

    def record(site, x):
        if site in paths:
            found[site] = input_errors(x, tables[site], candidates)
        return x

    with nn.intercept_methods(dynamic_interceptor(state, on_input=record)):
        model.apply(variables, batch, **dict(kwargs))
    return found


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
    mesh: Optional[Mesh] = None,
    **apply_kwargs: Any,
) -> np.ndarray:
    """[layers, candidates] mean_n ‖Q_b(A_{i,n}) − A_{i,n}‖² with the calibrated quantizers.

    With `quant` (a `QuantPoint`), the inputs A_{i,n} are those of the quantized model. Each batch is split
    over `mesh` (None: all devices; `data_parallel`).
    """
    paths = tuple(l.path for l in layers)
    missing = [p for p in paths if p not in act_params]
    if missing:
        raise ValueError(f"no calibrated activation range for layer(s) {missing[:5]}")
    if quant is not None:
        attention = sorted({s.rsplit("/", 1)[0] for s in quant.act_params if s.endswith("/q")})
        state = dynamic_bits(quant.act_params, attention, quant.spec.bits, dict(quant.spec.attention))
        variables = quant.variables
    else:
        state = DynamicBits({}, {}, {})
    tables = {p: np.asarray(act_params[p]) for p in paths}
    total = {p: np.zeros(len(candidates)) for p in paths}
    args, static = (variables, tables, state), {"paths": paths, "candidates": tuple(candidates)}
    for found in per_batch(_batch_activation_errors, model, args, images, batch_size, mesh, apply_kwargs, **static):
        for site, errs in found.items():
            total[site] += np.sum(np.asarray(errs, np.float64), axis=0)  # per image, in order: split-independent
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
      predicted_low: [items] ΔL̂ at the probe bits b_low.
      fisher_weight: [items] tr(F^W) (mode 'mean').
      measured_low: {item index: measured ΔL at b_low} (mode 'probe').

    Formulas: probe α_t = Σ_{i∈P_t} ΔL_i / Σ_{i∈P_t} ΔL̂_i; mean α_t = 1 / mean_{i∈t} tr(F^W_i); none α_t = 1.
    """
    if mode not in TYPE_ALPHA_MODES:
        raise ValueError(f"alpha mode must be one of {TYPE_ALPHA_MODES}, got {mode!r}")
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


def alpha_by_unit(
    types: Sequence[str],
    predicted: np.ndarray,
    measured: Mapping[int, float],
    *,
    floor_fraction: float = 0.1,
    floor: float = 1e-12,
) -> np.ndarray:
    """[units] α_i = max(ΔJ_i, f · α_t ΔL̂_i) / ΔL̂_i: each unit scaled by its own measured increase.

    Args:
      types: type of each unit.
      predicted: [units] ΔL̂_i at the probe bit-width.
      measured: {unit index: ΔJ_i at the probe bit-width} for every unit.
      floor_fraction: f; a unit whose measured increase is below f times its type's figure
        (α_t of mode 'probe' over all units) keeps that floor, so that noise never makes a unit free.

    The per-unit α keeps the shape of ΔL̂_i(b) over b and sets its level from the measurement.
    """
    missing = [i for i in range(len(types)) if i not in measured]
    if missing:
        raise ValueError(f"alpha mode 'layer' needs every unit measured; unit(s) {missing[:5]} are not")
    by_type = alpha_by_type("probe", types, predicted, measured_low=measured, floor=floor)
    pred = np.maximum(np.asarray(predicted, np.float64), floor)
    type_alpha = np.array([by_type[t] for t in types])
    meas = np.array([measured[i] for i in range(len(types))])
    return np.maximum(meas, floor_fraction * type_alpha * pred) / pred


def random_costs(num_layers: int, candidates: Sequence[int], seed: int) -> np.ndarray:
    """[layers, candidates] costs −u_i · b with u_i ~ U(0, 1): the ILP then spends the budget at random."""
    u = np.random.default_rng(seed).uniform(size=(num_layers, 1))
    return -u * np.asarray(candidates, np.float64)[None, :]


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
