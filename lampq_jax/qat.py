"""Quantization-aware fine-tuning after allocation, in optax's style: init, loss, step, back to a result.

The bits, the weights' grids (per-channel scale and zero point) and the activation ranges of a
`QuantizationResult` stay fixed; its float weights are trained through the fake-quantized model with
straight-through gradients:

    state = qat_init(result, optimizer)                       # params = the result's weights
    step = jax.jit(qat_step(result, optimizer))               # pure: (state, images, targets) -> (state, loss)
    for images in batches:
        state, loss = step(state, images, teacher(images))    # targets: the FP model's outputs
    tuned = qat_result(result, state)                         # a QuantizationResult like any other

The default loss is distillation: J(f_Q(x), f_FP(x)) with the calibration objectives of
`sensitivity.objective` (KL for logits, 1 − cos for features); any `fn(q_out, targets, labels) -> scalar`
with the user's labels works too. The training starts at the PTQ point: the result's weights are
already on their grids, so step 0's model is the PTQ model.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from lampq_jax.apply.calibration import batched_outputs, check_images
from lampq_jax.apply.fake import activation_interceptor, layer_kernels, with_kernels, with_weights
from lampq_jax.apply.model import QuantizedModel
from lampq_jax.quant import UniformParams, fake_quant, fake_quant_ste, quantize
from lampq_jax.quant.qtensor import QuantizedTensor
from lampq_jax.result import QuantizationResult
from lampq_jax.sensitivity.objective import resolve_objective

Loss = Callable[[jax.Array, jax.Array, Optional[jax.Array]], jax.Array]


class QATState(NamedTuple):
    """What a QAT step updates: the float weights, the optimizer's state and the step count."""

    params: Any
    opt_state: optax.OptState
    step: jax.Array


def result_output(result: QuantizationResult, output: Optional[str] = None) -> str:
    """'logits' or 'features': `output` if given, else the result's config (`quantize_uniform` records none:
    'logits')."""
    if output is not None:
        if output not in ("logits", "features"):
            raise ValueError(f"output must be 'logits' or 'features', got {output!r}")
        return output
    return str(result.report.get("config", {}).get("output", "logits"))


def qat_init(result: QuantizationResult, optimizer: optax.GradientTransformation) -> QATState:
    """The state at the PTQ point: the result's (already on-grid) weights and a fresh optimizer state."""
    params = result.quantized.variables["params"]
    return QATState(params=params, opt_state=optimizer.init(params), step=jnp.zeros([], jnp.int32))


def weight_grids(result: QuantizationResult) -> dict[str, UniformParams]:
    """{layer path: UniformParams} of each kernel's per-output-channel grid, broadcastable against the kernel.

    The grids are those the result's kernels were quantized on (`QuantizedModel.weights`: PTQ's clipping
    search, codes by RTN or GPTQ); they stay fixed while the weights train, so that fake-quantizing a
    result's own kernel on its grid gives it back exactly.
    """
    q = result.quantized
    out_axes = {l.path: tuple(l.out_axes) for l in q.layers}
    missing = sorted(set(q.bits) - set(q.weights))
    if missing:
        raise ValueError(f"layer(s) {missing[:5]} have no codes in the result (QuantizedModel.weights)")
    return {path: q.weights[path].grid(out_axes[path]) for path in q.bits}


def quantize_on_grids(
    params: Any, grids: dict[str, UniformParams], bits: dict[str, tuple[int, int]], *, ste: bool
) -> Any:
    """`params` with each kernel of `grids` fake-quantized on its fixed grid (straight-through when `ste`)."""
    kernels = layer_kernels({"params": params}, list(grids))
    quant = fake_quant_ste if ste else fake_quant
    return with_kernels({"params": params}, {p: quant(k, grids[p], bits[p][0]) for p, k in kernels.items()})["params"]


def student_apply(
    result: QuantizationResult, grids: Optional[dict[str, UniformParams]] = None, **apply_kwargs: Any
) -> Callable[[Any, jax.Array], jax.Array]:
    """`fn(params, images) -> outputs`: the result's fake-quantized model with straight-through gradients.

    Weights are fake-quantized on their fixed PTQ grids (`weight_grids`) inside every call, activations
    with the result's calibrated ranges and bits; gradients pass the rounding (clipped STE).
    """
    q = result.quantized
    grids = weight_grids(result) if grids is None else grids
    kwargs = {**q.apply_kwargs, **apply_kwargs}
    others = {k: v for k, v in dict(q.variables).items() if k != "params"}
    interceptor = activation_interceptor(q.spec, q.act_params, ste=True)

    def fn(params, images):
        qparams = quantize_on_grids(params, grids, q.bits, ste=True)
        with nn.intercept_methods(interceptor):
            return q.model.apply({**others, "params": qparams}, images, **kwargs)

    return fn


def qat_loss(
    result: QuantizationResult,
    loss: Optional[Loss | str] = None,
    *,
    labels_given: bool = False,
    grids: Optional[dict[str, UniformParams]] = None,
    output: Optional[str] = None,
    **apply_kwargs: Any,
) -> Callable[[Any, jax.Array, jax.Array, Optional[jax.Array]], jax.Array]:
    """`fn(params, images, targets, labels) -> scalar`: `loss` of the quantized outputs against `targets`.

    `loss`: None (distillation to the FP outputs: 'kl' for logits, 'cosine' for features; 'cross_entropy'
    with labels), a name of `sensitivity.objective`, or `fn(q_out, targets, labels) -> scalar`.
    `output`: 'logits' or 'features', for the default loss; None: the result's (`result_output`).
    """
    objective = resolve_objective(loss, labels_given=labels_given, output=result_output(result, output))
    forward = student_apply(result, grids, **apply_kwargs)

    def fn(params, images, targets, labels=None):
        return objective(forward(params, images), targets, labels)

    return fn


def qat_step(
    result: QuantizationResult,
    optimizer: optax.GradientTransformation,
    loss: Optional[Loss | str] = None,
    *,
    labels_given: bool = False,
    grids: Optional[dict[str, UniformParams]] = None,
    output: Optional[str] = None,
    **apply_kwargs: Any,
):
    """A pure step `(state, images, targets, labels=None) -> (state, loss)`; jit it (or not) where you call it.

    images [B, ...], targets the FP model's outputs on them [B, ...] (or anything `loss` compares with),
    labels [B] or None.
    """
    loss_fn = qat_loss(result, loss, labels_given=labels_given, grids=grids, output=output, **apply_kwargs)

    def step(state: QATState, images, targets, labels=None) -> tuple[QATState, jax.Array]:
        value, grads = jax.value_and_grad(loss_fn)(state.params, images, targets, labels)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return QATState(params, opt_state, state.step + 1), value

    return step


def qat_result(
    result: QuantizationResult,
    state: QATState,
    *,
    record: Optional[dict] = None,
    grids: Optional[dict[str, UniformParams]] = None,
) -> QuantizationResult:
    """A `QuantizationResult` with the trained weights fake-quantized on their grids (same bits, same ranges).

    It saves, exports and evaluates like any other; `report['qat']` holds `record` (steps, optimizer, …).
    """
    q = result.quantized
    grids = weight_grids(result) if grids is None else grids
    kernels = layer_kernels({"params": state.params}, list(grids))
    out_axes = {l.path: tuple(l.out_axes) for l in q.layers}
    weights = {
        p: QuantizedTensor.from_kernel(
            quantize(k, grids[p], q.bits[p][0]), grids[p], q.bits[p][0], out_axes[p], dtype=k.dtype
        )
        for p, k in kernels.items()
    }
    variables = with_weights({**dict(q.variables), "params": state.params}, q.layers, weights)
    quantized = QuantizedModel(
        q.model, q.layers, q.spec, variables, q.act_params, dict(q.apply_kwargs), {**q.weights, **weights}
    )
    report = {**result.report, "qat": {"steps": int(state.step), **(record or {})}}
    return dataclasses.replace(result, quantized=quantized, method=f"{result.method}+qat", report=report)


def finetune(
    result: QuantizationResult,
    fp_variables: Any,
    images: Any,
    *,
    steps: int,
    batch_size: int = 32,
    optimizer: Optional[optax.GradientTransformation] = None,
    learning_rate: float = 1e-4,
    labels: Optional[Any] = None,
    loss: Optional[Loss | str] = None,
    output: Optional[str] = None,
    validation: Optional[Any] = None,
    eval_every: int = 50,
    seed: int = 0,
    progress: bool = True,
    **apply_kwargs: Any,
) -> QuantizationResult:
    """QAT by distillation to the FP model (`fp_variables`) on `images` [N, ...]: the loop around `qat_step`.

    Each step draws a minibatch of `batch_size` images (without replacement within an epoch, seeded).
    The default optimizer is `optax.adam(learning_rate)`; `loss` and `output` as in `qat_loss`.
    With `validation` images [M, ...], the distillation loss on them is measured at step 0 (the PTQ
    point), every `eval_every` steps and at the end, and the weights with the lowest one are kept, so
    fine-tuning that does not help returns the PTQ weights.

    Raises:
      ValueError: steps, batch_size or eval_every < 1, empty or non-finite images (`check_images`), labels
        of the wrong shape, named.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    for name, value in (("batch_size", batch_size), ("eval_every", eval_every)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    images = check_images(images, "images")
    validation = None if validation is None else check_images(validation, "validation images")
    if labels is not None:
        labels = np.asarray(labels)
        if labels.shape != (images.shape[0],):
            raise ValueError(f"labels must have shape ({images.shape[0]},), got {labels.shape}")
    optimizer_name = "user optimizer" if optimizer is not None else f"optax.adam({learning_rate:g})"
    optimizer = optimizer or optax.adam(learning_rate)
    q = result.quantized
    kwargs = {**q.apply_kwargs, **apply_kwargs}
    teacher = jax.jit(lambda x: q.model.apply(fp_variables, x, **kwargs))
    targets = _batched(teacher, images)
    grids = weight_grids(result)
    step = jax.jit(
        qat_step(result, optimizer, loss, labels_given=labels is not None, grids=grids, output=output, **apply_kwargs)
    )
    state = qat_init(result, optimizer)
    if validation is not None:
        forward = jax.jit(student_apply(result, grids, **apply_kwargs))
        distillation = resolve_objective(None, labels_given=False, output=result_output(result, output))
        val_targets = _batched(teacher, validation)

        def validate(params) -> float:
            return float(distillation(_batched(lambda x: forward(params, x), validation), val_targets, None))

        best = {"step": 0, "loss": validate(state.params), "params": state.params}
        val_history = [(0, best["loss"])]
    batch = min(batch_size, len(images))
    order, rng, losses = np.zeros(0, int), np.random.default_rng(seed), []
    start = time.perf_counter()
    for k in tqdm(range(steps), desc="QAT", disable=not progress, leave=False):
        if len(order) < batch:
            order = np.concatenate([order, rng.permutation(len(images))])
        pick, order = order[:batch], order[batch:]
        state, value = step(state, images[pick], targets[pick], None if labels is None else labels[pick])
        losses.append(float(value))
        if not np.isfinite(losses[-1]):
            raise ValueError(f"QAT loss became {losses[-1]} at step {k}; lower the learning rate")
        if validation is not None and ((k + 1) % eval_every == 0 or k + 1 == steps):
            val_history.append((k + 1, validate(state.params)))
            if val_history[-1][1] < best["loss"]:
                best = {"step": k + 1, "loss": val_history[-1][1], "params": state.params}
    record = {
        "batch_size": batch,
        "optimizer": optimizer_name,
        "seconds": time.perf_counter() - start,
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "images": int(len(images)),
    }
    if validation is not None:
        record.update(
            validation_images=int(len(validation)),
            best_step=best["step"],
            validation_loss=[[s, v] for s, v in val_history],
        )
        state = state._replace(params=best["params"])
    return qat_result(result, state, record=record, grids=grids)


def _batched(fn: Callable[[Any], Any], images: np.ndarray) -> np.ndarray:
    """fn's outputs on `images`, 256 at a time, concatenated on the host."""
    return batched_outputs(fn, images, 256)
