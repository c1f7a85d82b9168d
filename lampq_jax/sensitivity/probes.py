"""The type-aware α from single-unit probes (METHOD.md §3), and the metric check's Spearman figures.

A unit is a layer group. Some units of each type (all of them for the metric check or α = 'layer') are
quantized alone at the probe bits b_low (`probe_width`: by default one candidate below the budget) and their
ΔJ measured; α scales each type's predicted ΔL so that

    Ω_i(b) = α_{type(i)} · (Ω^W_i(b) + Ω^A_i(b))

matches what was measured (`metric.alpha_by_type`, `metric.alpha_by_unit`).
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Optional, Sequence

import numpy as np
from tqdm.auto import tqdm

from lampq_jax.sensitivity.fisher import FisherTraces
from lampq_jax.sensitivity.metric import alpha_by_type, alpha_by_unit, probe_indices, spearman


def probe_width(candidates: Sequence[int], probe_bits: Optional[int], budget: float, budget_kind: str) -> int:
    """b_low, the bit-width of the probes: `probe_bits` when set; else the largest candidate below ⌊β⌋.

    One step under the budget's whole bits is where the allocation trades bits, so α measured there ranks
    those trades. On DINOv2-S/14 at β = 6 (3 calibration draws, benchmarks/RESULTS.md) LampQ's held-out
    error was 0.79 ± 0.16 of uniform's this way (bench_real_vit_lampq_defaults); with METHOD.md §4's probes at
    the lowest candidate it kept uniform in every draw (1.00). A later run whose Fisher traces and weight
    scales differ only by float rounding gave 1.01 ± 0.32 (bench_real_vit_lampq_speed): the round kept by J
    on the calibration crops decides, and it over-fits them; with J on held-out crops (`LampQConfig.holdout`)
    the 6-bit ratio is 0.99 ± 0.06 (bench_real_vit_lampq_holdout). The lowest candidate when no candidate is below
    ⌊β⌋, or when β is a byte count (`budget_kind='model_bytes'`), not bits.
    """
    if probe_bits is not None:
        return probe_bits
    below = [b for b in candidates if b < math.floor(budget)]
    return max(below) if below and budget_kind != "model_bytes" else min(candidates)


class ProbedAlpha(NamedTuple):
    """What the probes give."""

    alpha: dict[str, float]  # α by type
    layer_alpha: np.ndarray  # [layers] α of each layer
    measured: dict[int, float]  # {unit index: measured ΔJ alone at the probe bits}
    spearman: dict[str, float]  # {α mode: Spearman of Ω against the measured ΔJ} (metric check)
    unit_keys: list[str]  # the units (layer groups), in order


def probe_alpha(
    alloc_layers: Sequence[Any],
    w_term: np.ndarray,
    a_term: np.ndarray,
    fisher: FisherTraces,
    config: Any,
    measure_alone: Callable[[dict[str, tuple[int, int]]], float],
    b_low: int,
) -> ProbedAlpha:
    """α from single-unit probes (units: layer groups), and the metric check's Spearman figures.

    Args:
      alloc_layers: the allocated layers; a unit is a layer group (q, k, v of one attention share one).
      w_term, a_term: [layers, candidates] predicted ΔL of quantizing each layer's weights / inputs.
      fisher: the Fisher traces (the weight traces weigh α = 'mean').
      config: a `LampQConfig` (alpha, probes, candidates, metric_check, progress).
      measure_alone: {path: (b_w, b_a)} → measured ΔJ with only those layers quantized.
      b_low: the probe bits (`probe_width`), one of `config.candidates`.

    With α = 'layer' every unit is probed and scaled alone; the by-type figure is then the 'probe' one.
    """
    units: dict[str, list[int]] = {}
    for j, l in enumerate(alloc_layers):
        units.setdefault(l.group, []).append(j)
    unit_keys = list(units)
    unit_types = [alloc_layers[units[k][0]].type for k in unit_keys]
    col = config.candidates.index(b_low)
    predicted_low = np.array([(w_term[u, col] + a_term[u, col]).sum() for u in units.values()])
    probed: set[int] = set()  # the P units per type that α = 'probe' scales by
    for t in set(unit_types):
        members = [k for k, tk in enumerate(unit_types) if tk == t]
        probed.update(members[i] for i in probe_indices(len(members), config.probes))
    to_measure = set(probed) if config.alpha == "probe" else set()
    if config.metric_check or config.alpha == "layer":
        to_measure.update(range(len(unit_keys)))
    measured = {}
    for k in tqdm(sorted(to_measure), desc="single-layer probes", disable=not config.progress, leave=False):
        measured[k] = measure_alone({alloc_layers[j].path: (b_low, b_low) for j in units[unit_keys[k]]})
    fisher_w = np.array([np.mean([fisher.weight[alloc_layers[j].path] for j in u]) for u in units.values()])
    # α = 'probe' from its P units per type only: the metric check measures the others, but does not move α
    from_probes = {k: v for k, v in measured.items() if k in probed}
    figures = {}
    for mode in ("none", "mean", "probe"):
        if mode == "probe" and config.alpha not in ("probe", "layer") and not config.metric_check:
            continue
        figures[mode] = alpha_by_type(mode, unit_types, predicted_low, fisher_weight=fisher_w, measured_low=from_probes)
    spearman_figures = {}
    if config.metric_check and len(unit_keys) >= 2:
        order = sorted(measured)
        for mode, a_mode in figures.items():
            omega = [a_mode[unit_types[k]] * predicted_low[k] for k in order]
            spearman_figures[mode] = spearman(omega, [measured[k] for k in order])
    if config.alpha == "layer":
        unit_alpha = alpha_by_unit(unit_types, predicted_low, measured)
        layer_alpha = np.empty(len(alloc_layers))
        for k, members in enumerate(units.values()):
            layer_alpha[members] = unit_alpha[k]
        return ProbedAlpha(figures["probe"], layer_alpha, measured, spearman_figures, unit_keys)
    alpha = figures[config.alpha]
    return ProbedAlpha(alpha, np.array([alpha[l.type] for l in alloc_layers]), measured, spearman_figures, unit_keys)
