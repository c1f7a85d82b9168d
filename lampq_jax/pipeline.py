"""The method, stage by stage: discovery → calibration → Fisher → α → ILP → updates → quantized model."""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from tqdm.auto import tqdm

from lampq_jax.allocation import AllocationResult
from lampq_jax.allocation.items import (
    Items,
    allocation_problem,
    allowed_options,
    assignment_of,
    item_key,
    scale_bytes,
    uniform_choice,
)
from lampq_jax.apply import (
    QuantizedModel,
    QuantSpec,
    calibrate_activations,
    check_images,
    find_attention_paths,
)
from lampq_jax.apply.calibration import (
    ActivationParams,
    attention_minmax_sites,
    batched_outputs,
    channel_input_sites,
    layer_input_sites,
)
from lampq_jax.apply.data_parallel import replicate, resolve_mesh
from lampq_jax.apply.dynamic import DynamicQuantizer
from lampq_jax.apply.prefix import PrefixRunner
from lampq_jax.apply.hessians import input_hessians
from lampq_jax.apply.equalize import attention_statistics, fold_key_means, fold_query_key_ratios
from lampq_jax.config import (
    CHANNEL_TYPES_DEFAULT,
    MINMAX_TYPES_DEFAULT,
    QK_CALIBRATION_DEFAULT,
    WEIGHT_METHOD_DEFAULT,
    LampQConfig,
    check_qk_calibration,
    check_types,
    check_weight_method,
)
from lampq_jax.data.zero_shot import ZeroShotConfig, synthesize_from_config
from lampq_jax.layers import Layer, TypeRule, check_rules, find_layers, quantization_coverage
from lampq_jax.quant import check_bits
from lampq_jax.result import QuantizationResult
from lampq_jax.sensitivity import FisherTraces, fisher_traces
from lampq_jax.sensitivity.probes import probe_alpha, probe_width
from lampq_jax.sensitivity.vtptq import vtptq_metric
from lampq_jax.sensitivity.metric import (
    predicted_increase,
    random_costs,
    weight_errors,
)
from lampq_jax.sensitivity.objective import objective_name, resolve_objective

FIXED_TYPES_DEFAULT = ("embed", "head")


class _Timer:
    """Accumulates seconds per stage: `with timer('fisher'): ...`."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    def __call__(self, stage: str):
        timer = self

        class _Stage:
            def __enter__(self):
                self.start = time.perf_counter()

            def __exit__(self, *exc):
                timer.seconds[stage] = timer.seconds.get(stage, 0.0) + time.perf_counter() - self.start

        return _Stage()


def checked_rules(rules: Sequence[TypeRule]) -> tuple[tuple[str, str], ...]:
    """The user's (regex, type) rules as a tuple of pairs, checked before any work is done.

    Raises:
      ValueError: naming a rule that is not a pair, an invalid regex, or an unknown type.
    """
    if isinstance(rules, (str, bytes)):
        raise ValueError(f"rules must be a sequence of (regex, type) pairs, got the string {rules!r}")
    rules = tuple(rules)
    check_rules(rules)
    return tuple((str(pattern), str(t)) for pattern, t in rules)


def calibration_set(
    model,
    variables,
    calib_images,
    zero_shot: Optional[ZeroShotConfig],
    *,
    output: str,
    labels: Optional[Any],
    timer: _Timer,
    apply_kwargs,
) -> tuple[Any, Optional[np.ndarray], dict]:
    """(calibration images, the synthesized ones or None, report entry): the user's, or METHOD.md §7's.

    Raises:
      ValueError: neither or both of calib_images and zero_shot, or labels with zero_shot.
    """
    if zero_shot is None:
        if calib_images is None:
            raise ValueError("give calib_images [N, ...], or zero_shot=ZeroShotConfig(...) to synthesize them")
        return calib_images, None, {}
    if not isinstance(zero_shot, ZeroShotConfig):
        raise TypeError(f"zero_shot must be a ZeroShotConfig, got {type(zero_shot).__name__}")
    if calib_images is not None:
        raise ValueError("give calib_images or zero_shot, not both (zero_shot synthesizes the calibration images)")
    if labels is not None:
        raise ValueError("labels were given with zero_shot; synthesized images have no labels")
    output = zero_shot.output or output
    with timer("zero_shot"):
        images = synthesize_from_config(model, variables, zero_shot, output=output, **apply_kwargs)
    entry = {"zero_shot": {**dataclasses.asdict(zero_shot), "output": output, "seconds": timer.seconds["zero_shot"]}}
    return images, images, entry


@dataclasses.dataclass(frozen=True)
class _Prepared:
    """What every method shares: layers, attention paths, calibration."""

    images: np.ndarray
    layers: tuple[Layer, ...]
    attention: tuple[str, ...]
    act_params: ActivationParams
    variables: Any  # the model's variables after the exact key centering / query-key equalization (if on)
    rules: tuple[tuple[str, str], ...]  # the user's type rules
    base_quantizers: dict  # what the base quantizers did (for the report)
    hessians: Optional[dict[str, np.ndarray]]  # {path: XᵀX / n} of the GPTQ-rounded layers (weight_method='gptq')


def _prepare(
    model,
    variables,
    calib_images,
    *,
    rules,
    calibration,
    channel_types,
    minmax_types,
    center_keys,
    qk_calibration,
    equalize_qk,
    weight_method,
    batch_size,
    timer,
    mesh,
    apply_kwargs,
) -> _Prepared:
    images = check_images(calib_images)
    with timer("discovery"):
        layers = find_layers(model, variables, images[:1], rules=rules, **apply_kwargs)
        attention = find_attention_paths(model, variables, images[:1], **apply_kwargs)
    with timer("calibration"):
        uncentered = list(attention)
        calib_batch = max(batch_size, 32)  # every calibration pass runs at 32 images a batch or more
        passes = {"batch_size": calib_batch, "mesh": mesh, **apply_kwargs}
        if center_keys and attention:
            means = attention_statistics(model, variables, images, attention, "key_means", **passes)
            variables, uncentered = fold_key_means(variables, means)
        if equalize_qk and attention:
            ratios = attention_statistics(model, variables, images, attention, "query_key_ratios", **passes)
            variables = fold_query_key_ratios(variables, ratios)
        minmax_sites = attention_minmax_sites(attention) if qk_calibration == "minmax" else frozenset()
        minmax_sites |= layer_input_sites(layers, minmax_types)
        act_params = calibrate_activations(
            model,
            variables,
            images,
            method=calibration,
            batch_size=calib_batch,
            channel_sites=channel_input_sites(layers, channel_types),
            minmax_sites=minmax_sites,
            mesh=mesh,
            **apply_kwargs,
        )
        hessians = None
        if weight_method == "gptq":
            hessians = input_hessians(model, variables, images, layers, batch_size=calib_batch, **apply_kwargs)
    base = {
        "channel_types": list(channel_types),
        "minmax_types": list(minmax_types),
        "qk_calibration": qk_calibration,
        "equalize_qk": equalize_qk,
        "keys_centered": len(attention) - len(uncentered) if center_keys else 0,
        "keys_not_centered_no_bias": uncentered if center_keys else [],
        "weight_method": weight_method,
        "gptq_layers": len(hessians or {}),
    }
    return _Prepared(images, tuple(layers), tuple(attention), act_params, variables, rules, base, hessians)


def float_outputs(model, variables, images: np.ndarray, batch_size: int, mesh: Mesh, apply_kwargs) -> jax.Array:
    """The full-precision model's outputs on `images` [N, ...], `batch_size` a batch."""
    fp_apply = jax.jit(lambda v, x: model.apply(v, x, **apply_kwargs))
    replicated = replicate(variables, mesh)
    return jnp.asarray(batched_outputs(lambda b: fp_apply(replicated, b), images, batch_size, mesh))


def holdout_split(num_images: int, holdout: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(fit indices, held-out indices) of N calibration images: round(h N) held out, picked by a permutation
    seeded with `seed`, both sorted; with h = 0 every image is in both.

    Raises:
      ValueError: a split that leaves either part empty, naming N and h.
    """
    everything = np.arange(num_images)
    if holdout == 0:
        return everything, everything
    held = int(round(holdout * num_images))
    if held < 1 or held > num_images - 1:
        raise ValueError(
            f"holdout={holdout} of {num_images} calibration images holds out {held}; "
            "both the fitted and the held-out part need at least one image (holdout=0 measures J on the fitted ones)"
        )
    order = np.random.default_rng(seed).permutation(num_images)
    return np.sort(order[held:]), np.sort(order[:held])


def _prepare_options(config: LampQConfig) -> dict[str, Any]:
    """`_prepare`'s base-quantizer options, from `config`."""
    names = (
        "calibration",
        "channel_types",
        "minmax_types",
        "center_keys",
        "qk_calibration",
        "equalize_qk",
        "weight_method",
        "batch_size",
    )
    return {name: getattr(config, name) for name in names}


def quantize_uniform(
    model: nn.Module,
    variables: Any,
    calib_images: Optional[Any],
    bits: int,
    *,
    zero_shot: Optional[ZeroShotConfig] = None,
    fixed_bits: int = 8,
    fixed_types: tuple[str, ...] = FIXED_TYPES_DEFAULT,
    attn_bits: Optional[int] = None,
    calibration: str = "mse",
    channel_types: tuple[str, ...] = CHANNEL_TYPES_DEFAULT,
    minmax_types: tuple[str, ...] = MINMAX_TYPES_DEFAULT,
    center_keys: bool = True,
    qk_calibration: str = QK_CALIBRATION_DEFAULT,
    equalize_qk: bool = False,
    weight_method: str = WEIGHT_METHOD_DEFAULT,
    batch_size: int = 32,
    rules: Sequence[TypeRule] = (),
    mesh: Optional[Mesh] = None,
    **apply_kwargs: Any,
) -> QuantizationResult:
    """Quantizes every layer at W`bits`A`bits` (embed and head at `fixed_bits`): the uniform baseline.

    Args:
      model, variables: an unchanged flax.linen model and its variables.
      calib_images: calibration inputs [N, ...], finite; None with `zero_shot`.
      bits: weight and activation bits of every allocated layer, in [2, 8].
      fixed_bits: bits of the layers whose type is in `fixed_types`.
      attn_bits: bits of the attention matmul inputs (default: `bits`).
      calibration: activation range method, 'mse', 'percentile' or 'minmax'.
      channel_types: layer types whose inputs are quantized per channel (post-LayerNorm qkv / fc1,
        the attention output of proj, post-GELU fc2); () for per-tensor everywhere.
      minmax_types: layer types whose inputs are calibrated min-max whatever `calibration` (default
        ('embed',): the image; `LampQConfig.minmax_types`).
      center_keys: fold each attention's mean key out of its key bias (exact in float;
        `lampq_jax.apply.equalize`).
      qk_calibration: range method of the q·kᵀ inputs: 'minmax' (default) or 'same' (as `calibration`).
      weight_method: rounding of the weights on their per-channel grid: 'gptq' (default; `lampq_jax.quant.gptq`)
        or 'rtn' (round to nearest).
      equalize_qk: rescale each attention's query / key projections so that q and k share their channel
        ranges (exact in float; `lampq_jax.apply.equalize`).
      rules: the user's (regex, type) rules for the layer types, tried before the built-in ones, e.g.
        `[(r"layer_[0-9]+/(query|key|value)$", "qkv"), (r"^patch_embed$", "embed")]`; recorded in the result.
      zero_shot: synthesize the calibration images from the model (METHOD.md §7; output 'logits' unless the
        config says otherwise) instead of taking calib_images.
      mesh: the devices that calibration splits each batch over (None: all of `jax.devices()`; see
        `lampq_jax.apply.data_parallel`); the stages replicate the variables on them, the result keeps them
        where they were.
      **apply_kwargs: passed to `model.apply`, e.g. `train=False`.
    """
    rules = checked_rules(rules)
    mesh = resolve_mesh(mesh)
    check_bits(bits), check_bits(fixed_bits)
    attn_bits = bits if attn_bits is None else check_bits(attn_bits)
    timer = _Timer()
    check_types(channel_types, "channel_types")
    check_types(minmax_types, "minmax_types")
    check_qk_calibration(qk_calibration)
    check_weight_method(weight_method)
    calib_images, synthetic, zs_entry = calibration_set(
        model, variables, calib_images, zero_shot, output="logits", labels=None, timer=timer, apply_kwargs=apply_kwargs
    )
    prep = _prepare(
        model,
        variables,
        calib_images,
        rules=rules,
        calibration=calibration,
        channel_types=channel_types,
        minmax_types=minmax_types,
        center_keys=center_keys,
        qk_calibration=qk_calibration,
        equalize_qk=equalize_qk,
        weight_method=weight_method,
        batch_size=batch_size,
        timer=timer,
        mesh=mesh,
        apply_kwargs=apply_kwargs,
    )
    variables = prep.variables
    layer_bits = {l.path: (fixed_bits, fixed_bits) if l.type in fixed_types else (bits, bits) for l in prep.layers}
    return _finish(
        model,
        variables,
        prep,
        layer_bits,
        {p: attn_bits for p in prep.attention},
        fixed_types,
        "uniform",
        {"bits": bits, **zs_entry},
        timer,
        apply_kwargs,
        synthetic,
    )


def _finish(
    model,
    variables,
    prep,
    layer_bits,
    attention_bits,
    fixed_types,
    method,
    extra,
    timer,
    apply_kwargs,
    synthetic_images=None,
    quantizer: Optional[DynamicQuantizer] = None,
):
    spec = QuantSpec.build(prep.layers, layer_bits, attention_bits=attention_bits)
    with timer("quantize_weights"):
        weights = None if quantizer is None else quantizer.weights({p: wb for p, wb, _ in spec.layers})
        quantized = QuantizedModel.create(
            model, variables, prep.layers, spec, prep.act_params, apply_kwargs, hessians=prep.hessians, weights=weights
        )
    allocated = [l.path for l in prep.layers if l.type not in fixed_types] or None
    report = {"method": method, **extra, **size_report(prep.layers, layer_bits, variables, allocated)}
    report["attention_bits"] = dict(attention_bits)
    report["coverage"] = quantization_coverage(prep.layers, prep.attention, prep.rules)
    report["base_quantizers"] = prep.base_quantizers
    return QuantizationResult(
        quantized=quantized,
        method=method,
        report=report,
        timings=dict(timer.seconds),
        rules=prep.rules,
        synthetic_images=synthetic_images,
    )


def size_report(
    layers: Sequence[Layer],
    bits: Mapping[str, tuple[int, int]],
    variables: Any,
    allocated: Optional[Sequence[str]] = None,
) -> dict[str, float]:
    """Average weight / activation bits (all quantized layers, and the allocated ones), model bytes, BOPs.

    model bytes = Σ_i (|W_i| b_w / 8 + 8 · out channels) for quantized kernels + 4 bytes per other parameter.
    BOPs = Σ_i MACs_i · b_w · b_a per example.
    """
    by_path = {l.path: l for l in layers}
    quantized = [by_path[p] for p in bits]
    total_params = sum(int(np.prod(np.shape(x))) for x in jax.tree.leaves(dict(variables)["params"]))
    kernel_params = sum(l.num_weights for l in quantized)
    code_bytes = sum(l.num_weights * bits[l.path][0] / 8 for l in quantized)
    model_bytes = code_bytes + sum(scale_bytes(l) for l in quantized) + 4 * (total_params - kernel_params)

    def avg(items, index, weight):
        total = sum(weight(l) for l in items)
        return float(sum(weight(l) * bits[l.path][index] for l in items) / total) if total else float("nan")

    alloc = [by_path[p] for p in (allocated if allocated is not None else bits)]
    return {
        "avg_weight_bits": avg(quantized, 0, lambda l: l.num_weights),
        "avg_act_bits": avg(quantized, 1, lambda l: l.num_activations),
        "avg_weight_bits_allocated": avg(alloc, 0, lambda l: l.num_weights),
        "avg_act_bits_allocated": avg(alloc, 1, lambda l: l.num_activations),
        "model_bytes": float(model_bytes),
        "fp32_bytes": float(4 * total_params),
        "bops": float(sum(l.macs * bits[l.path][0] * bits[l.path][1] for l in quantized)),
        "fp_bops": float(sum(l.macs * 32 * 32 for l in quantized)),
    }


# ----------------------------------------------------------------------------- LampQ


def _omega_rows(layers, omega_w, omega_a, cands) -> dict[str, list[float]]:
    """{path: [Ω_i(b) for b in candidates]} (tied W/A bits) of one round, for the history."""
    return {l.path: [float(omega_w[j, c] + omega_a[j, c]) for c in range(len(cands))] for j, l in enumerate(layers)}


def _checked_labels(labels: Any, num_images: int, fp_outputs: jax.Array, output: str) -> np.ndarray:
    """labels [N] as an integer array; class indices in [0, C) of the logits [N, C] when output='logits'."""
    labels = np.asarray(labels)
    if labels.shape != (num_images,):
        raise ValueError(f"labels must have shape ({num_images},), got {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integer class indices, got dtype {labels.dtype}")
    if output == "logits" and fp_outputs.ndim == 2:
        classes = fp_outputs.shape[-1]
        outside = labels[(labels < 0) | (labels >= classes)]
        if outside.size:
            raise ValueError(
                f"labels must be class indices in [0, {classes}) of the model's {classes} logits; "
                f"{outside.size} of {num_images} are outside, e.g. {sorted(set(outside.tolist()))[:5]}"
            )
    return labels


@dataclasses.dataclass(frozen=True)
class _LampQRun:
    """What the stages of `quantize` share: the prepared model, the layers allocated and the measured J."""

    model: nn.Module
    prep: _Prepared
    config: LampQConfig
    alloc_layers: list[Layer]
    fixed_bits: dict[str, tuple[int, int]]  # {path: (w, a)} of the layers of `config.fixed_types`
    attention_bits: dict[str, int]  # {attention path: bits} of the q·kᵀ and softmax·v inputs
    fisher_labels: Optional[np.ndarray]  # labels of the empirical Fisher, None for the true Fisher
    rng: jax.Array
    mesh: Mesh
    apply_kwargs: dict[str, Any]
    timer: _Timer
    bar: Any  # the tqdm bar of the stages
    quantizer: DynamicQuantizer  # the model under any assignment, its quantized kernels cached
    outputs: Any  # (layer bits, attention bits) → the model's outputs on J's images, quantized so
    gap: Any  # outputs → J(outputs) − J_fp
    j_fp: float
    budget: float
    objective_name: str
    split: dict[str, int]  # {'fit': images fitted to, 'J': images J is measured on}

    def measure(self, bits: Mapping[str, tuple[int, int]], attention: Mapping[str, int]) -> float:
        """J(model quantized with `bits` and `attention` bits) − J_fp on J's images (the held-out ones with
        `config.holdout`)."""
        return self.gap(self.outputs(bits, attention))


def _lampq_run(
    model, variables, calib_images, budget, labels, objective, config, rules, zero_shot, mesh, timer, apply_kwargs
) -> tuple[_LampQRun, Optional[np.ndarray], dict]:
    """(the run, the synthesized images or None, the zero-shot report entry).

    Raises:
      ValueError: a budget that is not positive, unknown `fixed_layers` paths, no layer left to allocate,
        or fisher='empirical' without labels (and whatever `calibration_set` and `_prepare` raise).
    """
    rules = checked_rules(rules)
    mesh = resolve_mesh(mesh)
    if not np.isfinite(budget) or budget <= 0:
        raise ValueError(f"budget must be a positive number, got {budget}")
    calib_images, synthetic, zs_entry = calibration_set(
        model,
        variables,
        calib_images,
        zero_shot,
        output=config.output,
        labels=labels,
        timer=timer,
        apply_kwargs=apply_kwargs,
    )
    all_images = check_images(calib_images)
    fit, held = holdout_split(all_images.shape[0], config.holdout, config.seed)
    prep = _prepare(
        model,
        variables,
        all_images[fit],
        rules=rules,
        timer=timer,
        mesh=mesh,
        apply_kwargs=apply_kwargs,
        **_prepare_options(config),
    )
    layers = prep.layers
    j_images = all_images[held] if config.holdout else prep.images
    dq = DynamicQuantizer(
        model,
        replicate(prep.variables, mesh),
        layers,
        prep.attention,
        prep.act_params,
        apply_kwargs,
        hessians=prep.hessians,
    )
    # Probes skip the attention / MLP blocks before their layers (bit-identical outputs); None: the plain forward.
    prefix = PrefixRunner.build(dq, j_images, config.batch_size, mesh)
    with timer("calibration"):  # J's reference; the prefix keeps the blocks' float outputs of the same forward
        if prefix is not None:
            j_fp_outputs = jnp.asarray(prefix.float_outputs())
        else:
            j_fp_outputs = float_outputs(model, prep.variables, j_images, config.batch_size, mesh, apply_kwargs)
    j_labels = None
    if labels is not None:
        labels = _checked_labels(labels, all_images.shape[0], j_fp_outputs, config.output)
        labels, j_labels = labels[fit], labels[held]
    unknown = sorted(set(dict(config.fixed_layers)) - {l.path for l in layers})
    if unknown:
        raise ValueError(f"fixed_layers names unknown layer path(s) {unknown[:5]}")
    alloc_layers = [l for l in layers if l.type not in config.fixed_types]
    if not alloc_layers:
        raise ValueError(f"no layer to allocate: every layer's type is in fixed_types={config.fixed_types}")
    fixed_bits = {l.path: (config.fixed_bits, config.fixed_bits) for l in layers if l.type in config.fixed_types}
    attn_bits = config.attn_bits or int(np.clip(round(budget if config.budget_kind != "model_bytes" else 4), 2, 8))
    objective_fn = resolve_objective(objective, labels_given=labels is not None, output=config.output)
    fisher_kind = config.fisher if config.fisher != "auto" else ("empirical" if labels is not None else "true")
    if fisher_kind == "empirical" and labels is None:
        raise ValueError("fisher='empirical' needs labels")
    label_array = None if j_labels is None else jnp.asarray(j_labels)

    def outputs(bits: Mapping[str, tuple[int, int]], attention: Mapping[str, int]) -> jax.Array:
        if prefix is not None:
            return jnp.asarray(prefix.outputs(bits, attention))
        return jnp.asarray(batched_outputs(lambda b: dq.apply(b, bits, attention), j_images, config.batch_size, mesh))

    def gap(outs: jax.Array) -> float:
        return float(objective_fn(outs, j_fp_outputs, label_array)) - j_fp

    j_fp = float(objective_fn(j_fp_outputs, j_fp_outputs, label_array))
    bar = tqdm(total=4 + config.iterations, desc="LampQ", disable=not config.progress, leave=False)
    run = _LampQRun(
        model=model,
        prep=prep,
        config=config,
        alloc_layers=alloc_layers,
        fixed_bits=fixed_bits,
        attention_bits={p: attn_bits for p in prep.attention},
        fisher_labels=labels if fisher_kind == "empirical" else None,
        rng=jax.random.key(config.seed),
        mesh=mesh,
        apply_kwargs=dict(apply_kwargs),
        timer=timer,
        bar=bar,
        quantizer=dq,
        outputs=outputs,
        gap=gap,
        j_fp=j_fp,
        budget=budget,
        objective_name=objective_name(objective, labels_given=labels is not None, output=config.output),
        split={"fit": len(fit), "J": len(held)},
    )
    return run, synthetic, zs_entry


@dataclasses.dataclass(frozen=True)
class _Sensitivity:
    """The metric of the allocated layers: rows are layers, columns `config.candidates`."""

    fisher: FisherTraces
    w_term: np.ndarray  # [layers, candidates] predicted ΔL of quantizing the weights (unscaled by α)
    a_term: np.ndarray  # [layers, candidates] the same of the input activations
    w_err: Optional[np.ndarray]  # [layers, candidates] weight quantization errors (None: vtptq / random)
    alpha: dict[str, float]  # α by type
    layer_alpha: np.ndarray  # [layers, 1] α of each layer
    measured: dict[int, float]  # {unit index: measured ΔJ alone at the probe bits}
    spearman: dict[str, float]  # {α mode: Spearman of Ω against the measured ΔJ}
    unit_keys: list[str]
    probe_bits: Optional[int]  # the probes' bits (None: no probes, metric 'vtptq' or 'random')


def _sensitivity(run: _LampQRun) -> _Sensitivity:
    """Ω's terms and α: the Fisher metric with probes (METHOD.md §§2–3), or VT-PTQ's / random costs."""
    config, layers, images, timer, bar = run.config, run.alloc_layers, run.prep.images, run.timer, run.bar
    variables, cands = run.prep.variables, list(config.candidates)
    if config.metric in ("vtptq", "random"):
        with timer("metric"):
            if config.metric == "vtptq":
                w_term = vtptq_metric(
                    run.model, variables, images, layers, run.prep.act_params, cands, **run.apply_kwargs
                )
            else:
                w_term = random_costs(len(layers), cands, config.seed)
        nan = {l.path: float("nan") for l in layers}
        bar.update(3)
        return _Sensitivity(
            fisher=FisherTraces(nan, dict(nan), len(images)),
            w_term=w_term,
            a_term=np.zeros_like(w_term),
            w_err=None,
            alpha={t: 1.0 for t in {l.type for l in layers}},
            layer_alpha=np.ones([len(layers), 1]),
            measured={},
            spearman={},
            unit_keys=[],
            probe_bits=None,
        )
    with timer("fisher"):
        bar.set_postfix_str("Fisher traces")
        # no outputs: the targets are drawn in the pass, as the rounds' passes draw theirs, so one compile serves all
        fisher = fisher_traces(
            run.model,
            variables,
            images,
            layers,
            labels=run.fisher_labels,
            rng=run.rng,
            batch_size=config.batch_size,
            output=config.output,
            act_params=run.prep.act_params,
            candidates=cands,
            mesh=run.mesh,
            method=config.fisher_method,
            **run.apply_kwargs,
        )
    bar.update()
    bar.set_postfix_str("quantization errors")
    with timer("metric"):
        w_err = weight_errors(variables, layers, cands)
        w_term, a_term = predicted_increase(fisher, layers, w_err, _input_errors(fisher, layers))
    bar.update()
    bar.set_postfix_str("single-layer probes")
    b_low = probe_width(config.candidates, config.probe_bits, run.budget, config.budget_kind)
    with timer("probe"):
        alpha, layer_alpha, measured, spearman_figures, unit_keys = probe_alpha(
            layers, w_term, a_term, fisher, config, lambda bits: run.measure(bits, {}), b_low
        )
    bar.update()
    return _Sensitivity(
        fisher=fisher,
        w_term=w_term,
        a_term=a_term,
        w_err=w_err,
        alpha=alpha,
        layer_alpha=layer_alpha[:, None],
        measured=measured,
        spearman=spearman_figures,
        unit_keys=unit_keys,
        probe_bits=b_low,
    )


def _input_errors(fisher: FisherTraces, layers: Sequence[Layer]) -> np.ndarray:
    """[layers, candidates] the activation errors that the Fisher pass measured beside the traces."""
    return np.stack([fisher.input_errors[l.path] for l in layers])


def _round_entry(
    k: int, bits, omega_w, omega_a, cands, layers, j_value: float, solution: AllocationResult, **timing: float
) -> dict[str, Any]:
    """One round of the report's history: its bits, Ω, measured J and the ILP's figures."""
    return {
        "round": k,
        "bits": bits,
        "omega": _omega_rows(layers, omega_w, omega_a, cands),
        "J": j_value,
        "ilp_status": solution.status,
        "ilp_objective": solution.objective,
        "mip_gap": solution.mip_gap,
        **timing,
    }


def _iterate(run: _LampQRun, sens: _Sensitivity, items: Items, solve) -> tuple[tuple[float, dict, int], list]:
    """((best J, its bits, its round), history): the ILP on Ω, then iterative updates (METHOD.md §5).

    Round k re-measures the Fisher traces and activation errors at round k−1's quantized point, damps Ω
    towards them and solves again; it stops when the bits repeat or J has not improved for two rounds.
    Where the next round runs whatever a round's J is (`_j_from_next_pass`), that J is taken from the outputs
    of the next round's Fisher pass, which runs the model at the same point on the same images, instead of
    from a forward of its own.
    """
    config, layers, prep, timer = run.config, run.alloc_layers, run.prep, run.timer
    cands = list(config.candidates)
    omega_w, omega_a = sens.layer_alpha * sens.w_term, sens.layer_alpha * sens.a_term
    run.bar.set_postfix_str("ILP")
    with timer("ilp"):
        solution = solve(omega_w, omega_a)
    assignment = assignment_of(items, layers, solution.choice)
    history = [
        _round_entry(0, assignment, omega_w, omega_a, cands, layers, None, solution, ilp_seconds=solution.solve_seconds)
    ]
    best, stale = None, 0

    def settle(j_value: float) -> None:  # the last round's J is known: keep the best, count the rounds since
        nonlocal best, stale
        history[-1]["J"] = j_value
        if best is None or j_value < best[0]:
            best, stale = (j_value, history[-1]["bits"], history[-1]["round"]), 0
        else:
            stale += 1

    deferred = _j_from_next_pass(config, 0, stale=0)
    if not deferred:
        with timer("evaluate"):
            settle(run.measure({**assignment, **run.fixed_bits}, run.attention_bits))
    run.bar.update()
    for k in range(1, config.iterations + 1):
        run.bar.set_postfix_str(f"iteration {k}")
        start = time.perf_counter()
        with timer("iterations"):
            point = run.quantizer.point({**assignment, **run.fixed_bits}, run.attention_bits)
            fisher_k = fisher_traces(
                run.model,
                prep.variables,
                prep.images,
                layers,
                labels=run.fisher_labels,
                rng=run.rng,
                batch_size=config.batch_size,
                output=config.output,
                quant=point,
                act_params=prep.act_params,
                candidates=cands,
                mesh=run.mesh,
                method=config.fisher_method,
                **run.apply_kwargs,
            )
            if deferred:
                settle(run.gap(jnp.asarray(fisher_k.outputs)))
            new_w, new_a = predicted_increase(fisher_k, layers, sens.w_err, _input_errors(fisher_k, layers))
            omega_w = config.damping * omega_w + (1 - config.damping) * sens.layer_alpha * new_w
            omega_a = config.damping * omega_a + (1 - config.damping) * sens.layer_alpha * new_a
            solution = solve(omega_w, omega_a)
            new_assignment = assignment_of(items, layers, solution.choice)
            repeated = new_assignment == assignment
            history.append(_round_entry(k, new_assignment, omega_w, omega_a, cands, layers, None, solution))
            deferred = not repeated and _j_from_next_pass(config, k, stale)
            if repeated:  # the rounds stop here, and J on the same bits and images is the last round's
                settle(history[-2]["J"])
            elif not deferred:
                settle(run.measure({**new_assignment, **run.fixed_bits}, run.attention_bits))
        history[-1]["seconds"] = time.perf_counter() - start
        run.bar.update()
        assignment = new_assignment
        if repeated or stale >= 2:
            break
    return best, history


def _j_from_next_pass(config: LampQConfig, k: int, stale: int) -> bool:
    """Whether round k's J can wait for round k + 1's Fisher pass: that round runs whatever the J is (k < K and,
    with J no better, fewer than two stale rounds), and its pass runs on J's images (no holdout)."""
    return k < config.iterations and stale == 0 and not config.holdout


def _keep_uniform(run: _LampQRun, items: Items, best, history: list) -> tuple[tuple[float, dict, Any], list]:
    """(best, history) with the uniform assignment at the budget measured too, and kept when its J is lower
    (`LampQConfig.keep_uniform`); unchanged when it is off, infeasible or already a round's bits."""
    config, layers = run.config, run.alloc_layers
    choice = uniform_choice(items, allowed_options(items, layers, config), config, run.budget)
    if not config.keep_uniform or choice is None:
        return best, history
    uniform = assignment_of(items, layers, choice)
    if any(h["bits"] == uniform for h in history):
        return best, history
    with run.timer("evaluate"):
        j_value = run.measure({**uniform, **run.fixed_bits}, run.attention_bits)
    entry = {"round": "uniform", "bits": uniform, "J": j_value, "ilp_status": "none (uniform at the budget)"}
    entry.update({"ilp_objective": None, "mip_gap": None})
    return (min(best, (j_value, uniform, "uniform"), key=lambda b: b[0])), [*history, entry]


def _lampq_result(run: _LampQRun, sens: _Sensitivity, best, history, synthetic, zs_entry) -> QuantizationResult:
    """The result at the best round's bits; the report adds config, α, Spearman, J by round and layer rows."""
    config, cands = run.config, list(run.config.candidates)
    final_bits = {**best[1], **run.fixed_bits}
    rows = []
    for j, l in enumerate(run.alloc_layers):
        alpha = float(sens.layer_alpha[j, 0])
        rows.append(
            {
                "path": l.path,
                "type": l.type,
                "group": item_key(l, config),
                "num_weights": l.num_weights,
                "macs": l.macs,
                "fisher_w": sens.fisher.weight[l.path],
                "fisher_a": sens.fisher.activation[l.path],
                "alpha": alpha,
                "omega": {str(b): float(alpha * (sens.w_term[j, c] + sens.a_term[j, c])) for c, b in enumerate(cands)},
                "bits": list(final_bits[l.path]),
            }
        )
    extra = {
        "budget": run.budget,
        "budget_kind": config.budget_kind,
        "config": dataclasses.asdict(config),
        "objective": run.objective_name,
        "fisher": "empirical" if run.fisher_labels is not None else "true",
        "fisher_method": sens.fisher.method if config.metric == "fisher" else None,
        "alpha": sens.alpha,
        "spearman": sens.spearman,
        "J_fp": run.j_fp,
        "J": best[0],
        "J_images": run.split,
        "best_round": best[2],
        "history": history,
        "layers": rows,
        "probe_bits": sens.probe_bits,
        "probes": {sens.unit_keys[k]: v for k, v in sens.measured.items()},
        **zs_entry,
    }
    prep = run.prep
    return _finish(
        run.model,
        prep.variables,
        prep,
        final_bits,
        run.attention_bits,
        config.fixed_types,
        "lampq",
        extra,
        run.timer,
        run.apply_kwargs,
        synthetic,
        quantizer=run.quantizer,
    )


def quantize(
    model: nn.Module,
    variables: Any,
    calib_images: Optional[Any] = None,
    *,
    budget: float,
    labels: Optional[Any] = None,
    objective: Optional[Any] = None,
    config: LampQConfig = LampQConfig(),
    rules: Sequence[TypeRule] = (),
    zero_shot: Optional[ZeroShotConfig] = None,
    mesh: Optional[Mesh] = None,
    **apply_kwargs: Any,
) -> QuantizationResult:
    """LampQ: per-layer bit-widths from the type-aware Fisher metric, the ILP and iterative updates.

    Args:
      model, variables: an unchanged flax.linen model and its variables.
      calib_images: calibration inputs [N, ...] (e.g. 32 images), finite; None with `zero_shot`.
      budget: β: average bits (default), BOPs bits, or bytes; see `LampQConfig.budget_kind`.
      labels: [N] labels: empirical Fisher and a cross-entropy objective.
      objective: 'kl', 'cross_entropy', 'cosine' or `fn(q_out, fp_out, labels) -> scalar`.
      config: every option of the method.
      rules: the user's (regex, type) rules for the layer types, tried before the built-in ones, e.g.
        `[(r"layer_[0-9]+/(query|key|value)$", "qkv"), (r"^patch_embed$", "embed")]`; recorded in the result.
      zero_shot: data-free mode (METHOD.md §7): the calibration images are synthesized from the model
        (`lampq_jax.data.zero_shot`, output `config.output` unless the ZeroShotConfig says otherwise), and
        kept in `result.synthetic_images`; everything after runs on them unchanged.
      mesh: the devices that calibration, Fisher traces, quantization errors, probes and J split each
        batch over (None: all of `jax.devices()`; see `lampq_jax.apply.data_parallel`).
      **apply_kwargs: passed to `model.apply`, e.g. `train=False`.

    Returns:
      A `QuantizationResult` with the bits per layer, `apply`, the report and timings.
    """
    run, synthetic, zs_entry = _lampq_run(
        model,
        variables,
        calib_images,
        budget,
        labels,
        objective,
        config,
        rules,
        zero_shot,
        mesh,
        _Timer(),
        apply_kwargs,
    )
    sens = _sensitivity(run)
    items, solve = allocation_problem(run.alloc_layers, config, budget)
    best, history = _keep_uniform(run, items, *_iterate(run, sens, items, solve))
    run.bar.close()
    return _lampq_result(run, sens, best, history, synthetic, zs_entry)


def metric_check(
    model: nn.Module,
    variables: Any,
    calib_images: Any,
    *,
    labels: Optional[Any] = None,
    objective: Optional[Any] = None,
    config: LampQConfig = LampQConfig(),
    rules: Sequence[TypeRule] = (),
    mesh: Optional[Mesh] = None,
    **apply_kwargs: Any,
) -> dict[str, float]:
    """Spearman rank correlation, over all layer groups, between Ω_i at the probe bits and the measured
    increase of the calibration objective when group i alone is quantized, for α = none, mean and probe.
    The probe bits are `config.probe_bits`, or the lowest candidate when it is None (there is no budget).

    Runs the sensitivity stages of `quantize` (no iterations) and returns {mode: r}; `rules` as in `quantize`.
    """
    rules = checked_rules(rules)
    probe_bits = config.probe_bits or min(config.candidates)  # no budget here: METHOD.md §4's lowest candidate
    config = dataclasses.replace(config, metric_check=True, iterations=0, metric="fisher", probe_bits=probe_bits)
    result = quantize(
        model,
        variables,
        calib_images,
        budget=float(max(config.candidates)),
        labels=labels,
        objective=objective,
        config=config,
        rules=rules,
        mesh=mesh,
        **apply_kwargs,
    )
    return dict(result.report["spearman"])
