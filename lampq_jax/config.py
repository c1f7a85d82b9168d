"""`LampQConfig`: every option of the method (METHOD.md), so each ablation is one field."""

from __future__ import annotations

import dataclasses
from typing import Optional

from lampq_jax.allocation.ilp import BUDGET_KINDS as ALLOCATION_BUDGET_KINDS
from lampq_jax.layers.types import LAYER_TYPES
from lampq_jax.quant import check_bits

GRANULARITIES = ("layer", "module")
ALPHA_MODES = ("probe", "mean", "none", "layer")  # α per type (probe / mean / none) or per unit (layer)
# The budgets a user picks: the ILP's kinds but the activation average, which `separate_weight_act_bits` adds.
BUDGET_KINDS = tuple(kind for kind in ALLOCATION_BUDGET_KINDS if kind != "avg_act_bits")
CHANNEL_TYPES_DEFAULT = ("qkv", "proj", "fc1", "fc2")  # layer types whose inputs are quantized per channel
MINMAX_TYPES_DEFAULT = ("embed",)  # layer types whose inputs are calibrated min-max whatever the method
QK_CALIBRATIONS = ("minmax", "same")  # range method of the q·kᵀ inputs: min-max, or the `calibration` method
QK_CALIBRATION_DEFAULT = "minmax"
WEIGHT_METHODS = ("gptq", "rtn")  # rounding of the weights on their grid: GPTQ, or round to nearest
WEIGHT_METHOD_DEFAULT = "gptq"


def check_qk_calibration(value: str) -> str:
    """Checks a `qk_calibration` option; the error names the value."""
    if value not in QK_CALIBRATIONS:
        raise ValueError(f"qk_calibration must be one of {QK_CALIBRATIONS}, got {value!r}")
    return value


def check_weight_method(value: str) -> str:
    """Checks a `weight_method` option; the error names the value."""
    if value not in WEIGHT_METHODS:
        raise ValueError(f"weight_method must be one of {WEIGHT_METHODS}, got {value!r}")
    return value


def check_types(types: tuple[str, ...], name: str) -> tuple[str, ...]:
    """Checks that every entry of `types` is a layer type; the error names the unknown ones."""
    unknown = [t for t in types if t not in LAYER_TYPES]
    if isinstance(types, str) or unknown:
        raise ValueError(f"{name} must be a tuple of layer types from {LAYER_TYPES}, got {types!r}")
    return tuple(types)


# {LampQConfig field: its allowed values}, for the checks and for the CLI's choices.
FIELD_CHOICES = {
    "budget_kind": BUDGET_KINDS,
    "granularity": GRANULARITIES,
    "alpha": ALPHA_MODES,
    "calibration": ("mse", "percentile", "minmax"),
    "fisher": ("auto", "empirical", "true"),
    "fisher_method": ("batched", "vmap"),
    "output": ("logits", "features"),
    "metric": ("fisher", "vtptq", "random"),
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class LampQConfig:
    """Options of `lampq_jax.quantize`.

    Attributes:
      candidates: candidate bit-widths B.
      metric: 'fisher' (LampQ's ΔL̂ from Fisher traces) or 'vtptq' (nuclear norm × output perturbation,
        the VT-PTQ-style baseline) or 'random' (random costs: a random assignment within the budget);
        the last two need iterations=0.
      budget_kind: what `budget` limits: 'avg_bits' (Σ|W_i| b_i ≤ β Σ|W_i|), 'bops'
        (Σ MACs_i b_w b_a ≤ β² Σ MACs_i) or 'model_bytes' (β is the byte limit of the allocated layers).
      granularity: 'layer' (LampQ's I1) or 'module' (one bit-width per attention / MLP module).
      split_qkv: give q, k and v their own bit-widths instead of one for the three.
      alpha: type-aware scale α_t: 'probe' (I2), 'mean', or 'none' (HAWQ-style, no I2); or 'layer':
        every unit probed alone and scaled by its own measured increase (`metric.alpha_by_unit`).
      probes: P, layers (groups) probed per type for α = 'probe'.
      probe_bits: bit-width of the single-layer probes and of the metric check (None: the largest candidate
        below the budget's whole bits ⌊β⌋, else the lowest; `lampq_jax.sensitivity.probes.probe_width`).
      iterations: K, rounds of iterative bit updates (I3); 0 turns them off.
      damping: weight of the previous metric: Ω^(k) = d Ω^(k−1) + (1 − d) Ω_new.
      separate_weight_act_bits: allocate weight and activation bits separately.
      fixed_types: types kept at `fixed_bits` (embed and head by default).
      fixed_bits: bits of those layers.
      fixed_layers: {path: bits} the user fixes.
      min_bits, max_bits: per-type bounds, e.g. (('fc2', 4),).
      attn_bits: bits of the attention matmul inputs (None: the budget rounded).
      calibration: activation range method: 'mse', 'percentile' or 'minmax'.
      channel_types: layer types whose inputs are quantized per channel (post-LayerNorm qkv and fc1, the
        attention output of proj, post-GELU fc2); () quantizes every input per tensor.
      minmax_types: layer types whose inputs are calibrated min-max whatever `calibration`. Default
        ('embed',): the image keeps its whole range (an MSE clip fitted to a dark background cuts off bright
        pixels). On the real ViT it lifts the Fashion-MNIST probe at W8A8 from 76.7 % to 77.5 % (FP 77.7 %)
        and photo cosine at W5A5 / W4A4 (benchmarks/RESULTS.md, bench_real_vit); () clips the image too.
      center_keys: fold each attention's mean key out of its key bias (exact: softmax ignores a shift
        shared by all keys; `lampq_jax.apply.equalize`).
      qk_calibration: range method of the q·kᵀ inputs: 'minmax' (no clipping, default) or 'same' (as
        `calibration`).
      weight_method: rounding of the weights on their per-channel grid: 'gptq' (codes chosen against the
        layer's calibration inputs, `lampq_jax.quant.gptq`) or 'rtn' (round to nearest).
      equalize_qk: fold an exact per-channel rescaling into each attention's query / key projections so
        that q and k share their channel ranges (`lampq_jax.apply.equalize`).
      fisher: 'auto' (empirical with labels, true otherwise), 'empirical' or 'true'.
      fisher_method: how the Fisher pass takes per-sample gradients: 'batched' (one backward per chunk, the
        weight gradients from each layer's input and output gradient; 0.83× vmap's time on DINOv2-S/14) or 'vmap'
        (`jax.vmap(jax.grad)`, the reference); equal up to float32 summation (`sensitivity.fisher_traces`).
        'batched' runs 'vmap' where a layer is not a Dense / DenseGeneral called once (`fisher.batchable`).
      output: 'logits' or 'features' (likelihood of the true Fisher, default objective).
      batch_size: samples per chunk of the Fisher pass and per batch of the forwards that measure J (probes,
        rounds); the calibration passes take max(batch_size, 32). On a CPU small batches run faster: DINOv2-S/14's
        forward on 32 crops takes 0.73× (float) and 0.80× (W4A4) the time in batches of 8 that it takes in one
        batch of 32 (2 cores, bench_forward_batch).
      metric_check: also measure every group alone to report the metric's Spearman figure (METHOD.md §4's
        check; off by default: one forward pass per group, on DINOv2-S/14 48 passes, more than the rest of
        the search; `lampq_jax.metric_check` runs it alone, the CLI's --metric-check turns it on).
      keep_uniform: also measure the uniform assignment at the budget (W b A b, b the largest candidate ≤ β;
        not for 'model_bytes') and keep it when no round's J is lower, so that the search never returns an
        allocation its own objective rates below uniform's. Off in the peer baselines (hawq, vtptq, random).
      holdout: fraction h of the calibration images set aside for J: activation ranges, GPTQ and the Fisher
        pass use the other round((1 − h) N), and the probes, rounds and the keep-uniform choice are measured on
        round(h N) images they were not fitted to (a seeded permutation picks them); the quantized model is then
        calibrated on the (1 − h) N. 0 (default): J on the same images, as METHOD.md defines it. With 0.25 on
        DINOv2-S/14 LampQ's held-out error is unchanged and its time ~0.6× (bench_real_vit_lampq_holdout); on the
        embedded model it is 0.3 points lower at 3 bits, within the seeds' spread (bench_accuracy, lampq_ho).
      ilp_time_limit, mip_gap: the solver's limits.
      seed: seeds the true Fisher's targets.
      progress: show progress bars.
    """

    candidates: tuple[int, ...] = (2, 3, 4, 5, 6, 8)
    metric: str = "fisher"
    budget_kind: str = "avg_bits"
    granularity: str = "layer"
    split_qkv: bool = False
    alpha: str = "probe"
    probes: int = 4
    probe_bits: Optional[int] = None
    iterations: int = 3
    damping: float = 0.5
    separate_weight_act_bits: bool = False
    fixed_types: tuple[str, ...] = ("embed", "head")
    fixed_bits: int = 8
    fixed_layers: tuple[tuple[str, int], ...] = ()
    min_bits: tuple[tuple[str, int], ...] = ()
    max_bits: tuple[tuple[str, int], ...] = ()
    attn_bits: Optional[int] = None
    calibration: str = "mse"
    channel_types: tuple[str, ...] = CHANNEL_TYPES_DEFAULT
    minmax_types: tuple[str, ...] = MINMAX_TYPES_DEFAULT
    center_keys: bool = True
    qk_calibration: str = QK_CALIBRATION_DEFAULT
    weight_method: str = WEIGHT_METHOD_DEFAULT
    equalize_qk: bool = False
    fisher: str = "auto"
    fisher_method: str = "batched"
    output: str = "logits"
    batch_size: int = 8
    metric_check: bool = False
    keep_uniform: bool = True
    holdout: float = 0.0
    ilp_time_limit: float = 30.0
    mip_gap: float = 1e-4
    seed: int = 0
    progress: bool = True

    def __post_init__(self):
        for b in self.candidates:
            check_bits(b, f"every candidate of {self.candidates}")
        if not self.candidates or len(set(self.candidates)) != len(self.candidates):
            raise ValueError(f"candidates must be distinct integers in [2, 8], got {self.candidates}")
        object.__setattr__(self, "candidates", tuple(sorted(self.candidates)))
        for name, allowed in FIELD_CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        check_types(self.channel_types, "channel_types")
        check_types(self.minmax_types, "minmax_types")
        check_qk_calibration(self.qk_calibration)
        check_weight_method(self.weight_method)
        for name in ("probes", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.metric != "fisher" and self.iterations:
            raise ValueError(
                f"metric={self.metric!r} has no iterative updates; set iterations=0 (got {self.iterations})"
            )
        if self.probe_bits is not None and self.probe_bits not in self.candidates:
            raise ValueError(f"probe_bits={self.probe_bits} is not one of the candidates {self.candidates}")
        if self.iterations < 0:
            raise ValueError(f"iterations must be >= 0, got {self.iterations}")
        if not 0.0 <= self.holdout < 1.0:
            raise ValueError(f"holdout must be a fraction in [0, 1), got {self.holdout}")
        if not 0.0 <= self.damping < 1.0:
            raise ValueError(f"damping must be in [0, 1), got {self.damping}")
        for name in ("min_bits", "max_bits"):
            for t, b in getattr(self, name):
                if t not in LAYER_TYPES:
                    raise ValueError(f"{name} entry {(t, b)} needs a type in {LAYER_TYPES}")
                check_bits(b, f"the bits of {name} entry {(t, b)}")
        for path, b in self.fixed_layers:
            check_bits(b, f"the bits of fixed_layers entry {(path, b)}")
        check_bits(self.fixed_bits, "fixed_bits")
        if self.attn_bits is not None:
            check_bits(self.attn_bits, "attn_bits")
