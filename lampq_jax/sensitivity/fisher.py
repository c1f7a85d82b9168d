"""Per-sample Fisher traces of every layer's weight and input activation (METHOD.md §3).

For calibration samples x_n, n = 1..N, and per-sample log-likelihood ℓ_n = log p(y_n | x_n, θ):

    tr(F^W_i) = (1/N) Σ_n ‖∂ℓ_n / ∂W_i‖²          (weight Fisher trace of layer i)
    tr(F^A_i) = (1/N) Σ_n ‖∂ℓ_n / ∂A_{i,n}‖²      (activation Fisher trace; A_{i,n}: layer i's input)

∂ℓ_n/∂A_{i,n} is the gradient with respect to a zero perturbation that the interceptor adds to
the layer's input. Per-sample gradients come, in chunks of `batch_size` samples, either

- ('batched', the default) from one backward of Σ_n ℓ_n per chunk: the samples do not interact, so the
  gradient of a zero perturbation of layer i's output is δ_{i,n} = ∂ℓ_n/∂y_{i,n} [T, K_out], and with
  the layer's input x_{i,n} [T, K_in] (T: tokens) ∂ℓ_n/∂W_i = x_{i,n}ᵀ δ_{i,n}; or
- ('vmap', the reference) from `jax.vmap(jax.grad(...))` of each ℓ_n (`jax.lax.map(..., batch_size=k)`).

Each sample's gradients are reduced to per-layer squared norms inside the mapped function, so N × |θ| is
never held in memory. On DINOv2-S/14 (32 crops, 72 layers, 2 CPU cores) a pass takes 12.5 s batched and
15.1 s with vmap, and compiles in ~13 s against ~16 s (benchmarks/RESULTS.md, bench_fisher_methods).

Targets y_n: the given labels (empirical Fisher), or drawn from the model's own predictive
distribution with `rng` (true Fisher): categorical for logits, y = f(x) + ε with ε ~ N(0, I)
for features. A user `log_likelihood(output [1, ...], target) -> scalar` covers other tasks.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from lampq_jax.apply.calibration import ActivationParams, check_images, input_errors
from lampq_jax.apply.compiled import compiled
from lampq_jax.apply.data_parallel import (
    batch_spec,
    is_parallel,
    pad_to_multiple,
    replicate,
    resolve_mesh,
    shard_batch,
    shard_map_compat,
)
from lampq_jax.apply.dynamic import DynamicBits, dynamic_bits, dynamic_interceptor
from lampq_jax.apply.fake import QuantPoint, layer_kernels, with_kernels
from lampq_jax.apply.sites import site_interceptor
from lampq_jax.apply.static import static_module
from lampq_jax.layers.discovery import Layer, module_path

OUTPUT_KINDS = ("logits", "features")
FISHER_METHODS = ("batched", "vmap")
LogLikelihood = Callable[[jax.Array, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class FisherTraces:
    """Fisher traces per layer path.

    Attributes:
      weight: {path: tr(F^W_i)}.
      activation: {path: tr(F^A_i)}.
      num_samples: N.
      input_errors: {path: [candidates] mean_n ‖Q_b(A_{i,n}) − A_{i,n}‖²}, measured in the same forward when
        `fisher_traces` is given the activation quantizers and candidates (None otherwise).
      method: how the per-sample gradients were taken, 'batched' or 'vmap' (`fisher_traces`).
      outputs: [N, ...] the model's outputs on the images at the pass's point, from the pass's own forward
        (fake-quantized with straight-through gradients at a quantized point: the same values up to float
        rounding), so a caller needs no forward of its own for them.
    """

    weight: dict[str, float]
    activation: dict[str, float]
    num_samples: int
    input_errors: Optional[dict[str, np.ndarray]] = None
    method: str = "vmap"
    outputs: Optional[np.ndarray] = None


def categorical_log_likelihood(logits: jax.Array, label: jax.Array) -> jax.Array:
    """log softmax(logits)[label] for `logits: [1, classes]`, `label: []` int."""
    return jax.nn.log_softmax(logits.reshape(-1))[label]


def gaussian_log_likelihood(output: jax.Array, target: jax.Array) -> jax.Array:
    """−½ ‖target − output‖² (unit-variance Gaussian around the output, constants dropped)."""
    return -0.5 * jnp.sum((target.reshape(output.shape) - output) ** 2)


def target_noise(rng: jax.Array, shape: Sequence[int], dtype: Any, kind: str) -> jax.Array:
    """The randomness of the true Fisher's targets for outputs of `shape` [N, ...]: Gumbel noise g [N, classes]
    ('logits') or ε ~ N(0, I) of `shape` ('features'); `targets_from` turns it into targets."""
    if kind == "logits":
        return jax.random.gumbel(rng, (shape[0], math.prod(shape[1:])), dtype)
    return jax.random.normal(rng, tuple(shape), dtype)


def targets_from(outputs: jax.Array, noise: jax.Array, kind: str) -> jax.Array:
    """True-Fisher targets around `outputs` [n, ...] with `noise` (`target_noise`'s rows of those samples):
    'logits' → y_n = argmax(outputs_n + g_n), a draw from Categorical(softmax(outputs_n)) (Gumbel-max);
    'features' → y_n = outputs_n + ε_n."""
    if kind == "logits":
        return jnp.argmax(outputs.reshape(outputs.shape[0], -1) + noise, axis=-1)
    return outputs + noise.astype(outputs.dtype)


def sample_targets(outputs: jax.Array, rng: jax.Array, kind: str) -> jax.Array:
    """True-Fisher targets from the model's own predictive distribution.

    Args:
      outputs: [N, ...] model outputs; logits [N, classes] for kind='logits'.
      rng: a jax PRNG key.
      kind: 'logits' → y_n ~ Categorical(softmax(outputs_n)); 'features' → y_n = outputs_n + ε_n, ε ~ N(0, I).

    The same draws as `fisher_traces` makes inside its pass when it is given no outputs (`targets_from`).
    """
    return targets_from(outputs, target_noise(rng, outputs.shape, outputs.dtype, kind), kind)


def _attention_of(act_params: ActivationParams) -> list[str]:
    """The attention paths whose q·kᵀ and softmax·v inputs have calibrated ranges ('<path>/q' sites)."""
    return sorted({site.rsplit("/", 1)[0] for site in act_params if site.endswith("/q")})


def _adder(perturbations: dict[str, jax.Array]):
    def add(site: str, x: jax.Array) -> jax.Array:
        return x + perturbations[site].astype(x.dtype) if site in perturbations else x

    return add


def batchable(layer: Layer) -> bool:
    """Whether one batched backward gives `layer`'s per-sample weight gradients (`fisher_traces(method='batched')`):
    a Dense / DenseGeneral called once per forward whose input ends in the kernel's input axes and whose output
    ends in its output axes, so that ∂ℓ_n/∂W = Σ_t x_{n,t}ᵀ δ_{n,t} over the other axes t."""
    ndim = len(layer.weight_shape)
    n_out = len(layer.out_axes)
    if layer.kind not in ("dense", "dense_general") or layer.calls != 1:
        return False
    if tuple(a % ndim for a in layer.out_axes) != tuple(range(ndim - n_out, ndim)):
        return False
    in_dims, out_dims = layer.weight_shape[: ndim - n_out], layer.weight_shape[ndim - n_out :]
    return (
        tuple(layer.input_shape[-len(in_dims) :]) == tuple(in_dims)
        and tuple(layer.output_shape[-n_out:]) == tuple(out_dims)
        and len(layer.input_shape) > len(in_dims)
    )


def _batched_dims(layer: Layer) -> tuple[str, int, int, tuple[int, ...]]:
    """(path, K_in, K_out, output shape of one example) of a `batchable` layer."""
    k_out = math.prod(layer.output_shape[-len(layer.out_axes) :])
    return layer.path, math.prod(layer.weight_shape) // k_out, k_out, tuple(layer.output_shape[1:])


def _capturing(inner, outputs: dict[str, jax.Array], captured: dict[str, jax.Array]):
    """`inner` (an interceptor) with each layer in `outputs` adding `outputs[path]` to its output, and its input
    as the kernel sees it (after `inner`'s fake quantization) put in `captured[path]`."""

    def interceptor(next_fun, args, kwargs, context):
        path = module_path(context.module) if context.method_name == "__call__" else None
        if path not in outputs:
            return inner(next_fun, args, kwargs, context)

        def layer(x, *rest, **kw):
            captured[path] = x
            return next_fun(x, *rest, **kw) + outputs[path].astype(x.dtype)

        return inner(layer, args, kwargs, context)

    return interceptor


def _chunked(fn, arrays, size: int):
    """`fn` on consecutive chunks of `size` rows of `arrays` (a pytree [n, ...]), its [chunk, ...] results
    concatenated back to [n, ...]; the last chunk is padded with copies of the last row, which are dropped."""
    n = jax.tree.leaves(arrays)[0].shape[0]
    size = min(size, n)
    extra = -n % size
    pad = lambda a: jnp.concatenate([a, jnp.repeat(a[-1:], extra, axis=0)]) if extra else a
    chunks = jax.tree.map(lambda a: pad(a).reshape(-1, size, *a.shape[1:]), arrays)
    out = jax.lax.map(fn, chunks)
    return jax.tree.map(lambda a: a.reshape(-1, *a.shape[2:])[:n], out)


def _fisher_pass(
    variables,
    kernels,
    zeros,
    images,
    targets,
    state: DynamicBits,
    tables,
    *,
    model,
    kwargs,
    batch_size,
    likelihood,
    traced,
    mesh,
    num_samples,
    candidates,
    batched_layers,
    draw,
):
    """Per-sample squared gradient norms ({path: [n]} of the weights, of the inputs), input errors ({path:
    [n, candidates]} of the sites in `tables`) and the model's outputs [n, ...] of the first `num_samples`
    samples; with a `mesh` of several devices each maps its own slice of the samples (`shard_map`). `traced`: the
    model runs under `state`'s traced bits (0: float), so a float pass and the passes at quantized points are one
    compilation. `draw` None: `targets` are the targets; 'logits' / 'features': they are `target_noise`, and the
    targets are drawn around the pass's own outputs (`targets_from`), so no forward runs before the pass.

    `batched_layers` None: `vmap(grad)` of each sample's log-likelihood, chunks of `batch_size` samples.
    Else ((path, K_in, K_out, output shape of one example) of every layer): one backward of Σ_n ℓ_n per chunk, with respect to zero
    perturbations of each layer's input and output; the samples do not interact, so the gradient of the output
    perturbation at sample n is δ_n = ∂ℓ_n/∂y_n [T, K_out], and with the layer's input x_n [T, K_in] (as the
    kernel sees it) ∂ℓ_n/∂W = x_nᵀ δ_n."""

    def forward(kernels, perturbations, x, outputs=None, captured=None):
        errors, add = {}, _adder(perturbations)

        def on_input(site, value):
            if site in tables:
                errors[site] = input_errors(jax.lax.stop_gradient(value), tables[site], candidates)
            return add(site, value)

        if traced:
            interceptor = dynamic_interceptor(state, ste=True, on_input=on_input)
        else:
            interceptor = site_interceptor(on_input, layer_paths=frozenset(perturbations), attention_paths=frozenset())
        if outputs is not None:
            interceptor = _capturing(interceptor, outputs, captured)
        with nn.intercept_methods(interceptor):
            return model.apply(with_kernels(variables, kernels), x, **dict(kwargs)), errors

    def targets_of(output, y):  # [n, ...] outputs, [n, ...] targets or noise → [n, ...] targets
        return y if draw is None else targets_from(jax.lax.stop_gradient(output), y, draw)

    def per_sample(sample):
        x, y = sample

        def log_likelihood(k, p):
            output, errors = forward(k, p, x[None])
            target = targets_of(output, y[None])[0]
            return likelihood(output, target), ({site: e[0] for site, e in errors.items()}, output[0])

        (g_w, g_a), (errors, output) = jax.grad(log_likelihood, argnums=(0, 1), has_aux=True)(kernels, zeros)
        sq = lambda tree: {p: jnp.sum(jnp.square(g.astype(jnp.float32))) for p, g in tree.items()}
        return sq(g_w), sq(g_a), errors, output

    def per_chunk(chunk):
        x, y = chunk
        k = x.shape[0]
        inputs = {p: jnp.zeros((k, *z.shape[1:]), z.dtype) for p, z in zeros.items()}
        outputs = {p: jnp.zeros((k, *shape), jnp.float32) for p, _, _, shape in batched_layers}

        def log_likelihood(input_p, output_p):
            captured = {}
            output, errors = forward(kernels, input_p, x, output_p, captured)
            total = jnp.sum(jax.vmap(lambda o, t: likelihood(o[None], t))(output, targets_of(output, y)))
            return total, (errors, captured, output)

        grad = jax.grad(log_likelihood, argnums=(0, 1), has_aux=True)
        (g_a, g_y), (errors, captured, output) = grad(inputs, outputs)
        per_sample_sq = lambda g: jnp.sum(jnp.square(g.astype(jnp.float32)), axis=tuple(range(1, g.ndim)))
        g_w = {}
        for path, k_in, k_out, _ in batched_layers:
            x_in = captured[path].astype(jnp.float32).reshape(k, -1, k_in)
            grad_w = jnp.einsum("ntd,nte->nde", x_in, g_y[path].reshape(k, -1, k_out))  # [k, K_in, K_out]
            g_w[path] = jnp.sum(jnp.square(grad_w), axis=(1, 2))
        return g_w, {p: per_sample_sq(g) for p, g in g_a.items()}, errors, output

    def squared_norms(images, targets):  # {path: [n]} per sample, for the samples given
        if batched_layers is None:
            return jax.lax.map(per_sample, (images, targets), batch_size=min(batch_size, images.shape[0]))
        return _chunked(per_chunk, (images, targets), batch_size)

    if is_parallel(mesh):
        spec = batch_spec(mesh)
        squared_norms = shard_map_compat(squared_norms, mesh, in_specs=(spec, spec), out_specs=spec)
    return jax.tree.map(lambda v: v[:num_samples], squared_norms(images, targets))


def fisher_traces(
    model: nn.Module,
    variables: Any,
    images: Any,
    layers: Sequence[Layer],
    *,
    labels: Optional[Any] = None,
    rng: Optional[jax.Array] = None,
    batch_size: int = 8,
    output: str = "logits",
    log_likelihood: Optional[LogLikelihood] = None,
    quant: Optional[QuantPoint] = None,
    outputs: Optional[Any] = None,
    act_params: Optional[ActivationParams] = None,
    candidates: Sequence[int] = (),
    mesh: Optional[Mesh] = None,
    method: str = "batched",
    **apply_kwargs: Any,
) -> FisherTraces:
    """Weight and activation Fisher traces of `layers`, from per-sample gradients.

    Args:
      model, variables: the flax.linen model and its (full-precision) variables.
      images: calibration inputs [N, ...], finite, N ≥ 1.
      layers: the layers to measure (from `find_layers`).
      labels: [N] targets for the empirical Fisher; None draws targets with `rng` (true Fisher).
      rng: PRNG key for the true Fisher's targets (required when `labels` is None).
      batch_size: samples per vmapped chunk k; changes memory and speed, not the result.
      output: 'logits' (categorical likelihood) or 'features' (Gaussian likelihood).
      log_likelihood: `fn(output [1, ...], target) -> scalar`, replacing the built-in likelihoods.
      quant: a `QuantPoint` to measure at the quantized point (weights and activations
        fake-quantized, straight-through gradients), as the iterative updates need.
      outputs: the model's outputs on `images` at this point (full precision, or `quant`), when the caller
        has them: the true Fisher's targets are drawn around them. None: they are drawn inside the pass around
        its own outputs, with the same draws (`sample_targets`, `targets_from`).
      act_params, candidates: with both, the same forward also measures each layer's input errors at every
        candidate (`FisherTraces.input_errors`, as `metric.activation_errors` does in a pass of its own). With
        them a float pass (no `quant`) runs every site at 0 bits through the traced-bits interceptor, and shares
        its compilation with the passes at quantized points of the same model.
      mesh: the devices the samples are split over (None: all devices); each maps its own samples, with
        copies of the last sample as padding up to a multiple of the device count (left out of the mean).
      method: 'batched' (one backward of Σ_n ℓ_n per chunk; the per-sample weight gradients x_nᵀ δ_n from each
        layer's input and output gradient) or 'vmap' (`jax.vmap(jax.grad)` of each ℓ_n, the reference). Both
        give the same traces up to float32 summation order (~1e-6 relative). 'batched' needs every layer
        `batchable` and samples that do not interact in the forward (no batch statistics); with a layer that
        is not, the pass runs 'vmap' (`FisherTraces.method` says which ran).
      **apply_kwargs: passed to `model.apply`, e.g. `train=False`.

    Returns:
      `FisherTraces` with tr(F^W_i) and tr(F^A_i) per layer path.
    """
    if output not in OUTPUT_KINDS:
        raise ValueError(f"output must be one of {OUTPUT_KINDS}, got {output!r}")
    if method not in FISHER_METHODS:
        raise ValueError(f"method must be one of {FISHER_METHODS}, got {method!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    images = check_images(images)
    num_samples = int(images.shape[0])
    mesh = resolve_mesh(mesh)
    paths = [l.path for l in layers]
    if bool(candidates) != (act_params is not None):
        raise ValueError(f"input errors need both act_params and candidates; got candidates={tuple(candidates)}")
    if quant is not None:
        variables = quant.variables
        state = dynamic_bits(
            quant.act_params, _attention_of(quant.act_params), quant.spec.bits, dict(quant.spec.attention)
        )
    elif act_params is not None:  # float: every site at 0 bits, so this pass and the quantized ones share a compile
        state = dynamic_bits(act_params, _attention_of(act_params), {})
    else:
        state = DynamicBits({}, {}, {})
    traced = quant is not None or act_params is not None
    kernels = layer_kernels(variables, paths)
    candidates = tuple(int(b) for b in candidates)
    missing = [p for p in paths if candidates and p not in act_params]
    if missing:
        raise ValueError(f"no calibrated activation range for layer(s) {missing[:5]}")
    tables = {p: np.asarray(act_params[p]) for p in paths} if candidates else {}
    zeros = {l.path: jnp.zeros((1,) + tuple(l.input_shape[1:]), jnp.float32) for l in layers}
    kwargs = tuple(sorted(apply_kwargs.items()))
    variables, kernels, zeros, state = replicate((variables, kernels, zeros, state), mesh)

    draw = None
    if labels is not None:
        targets = np.asarray(labels)
        if targets.shape[0] != num_samples:
            raise ValueError(f"labels have {targets.shape[0]} entries for {num_samples} images")
    else:
        if rng is None:
            raise ValueError("the true Fisher (labels=None) needs rng, a jax.random key")
        if outputs is None:  # drawn in the pass, around its own outputs
            draw = output
            out = jax.eval_shape(lambda v, x: model.apply(v, x, **apply_kwargs), variables, images[:1])
            targets = np.asarray(target_noise(rng, (num_samples, *out.shape[1:]), out.dtype, output))
        elif outputs.shape[0] != num_samples:
            raise ValueError(f"outputs have {outputs.shape[0]} rows for {num_samples} images")
        else:
            targets = np.asarray(sample_targets(jnp.asarray(outputs), rng, output))
    likelihood = log_likelihood or (categorical_log_likelihood if output == "logits" else gaussian_log_likelihood)
    if is_parallel(mesh):
        images, targets = (pad_to_multiple(a, mesh.size) for a in (images, targets))
    batched_layers = None
    if method == "batched" and all(batchable(l) for l in layers):
        batched_layers = tuple(_batched_dims(l) for l in layers)
    fisher_pass = compiled(
        _fisher_pass,
        static_module(model),
        kwargs,
        batch_size=min(batch_size, num_samples),
        likelihood=likelihood,
        traced=traced,
        mesh=mesh if is_parallel(mesh) else None,
        num_samples=num_samples,
        candidates=candidates,
        batched_layers=batched_layers,
        draw=draw,
    )
    weight, activation, errors, pass_outputs = jax.device_get(
        fisher_pass(
            variables,
            kernels,
            zeros,
            shard_batch(images, mesh),
            shard_batch(targets, mesh),
            state,
            replicate(tables, mesh),
        )
    )
    # The means over samples are taken here in float64, so that they do not depend on how samples were split.
    return FisherTraces(
        weight={p: float(np.mean(np.asarray(weight[p], np.float64))) for p in paths},
        activation={p: float(np.mean(np.asarray(activation[p], np.float64))) for p in paths},
        num_samples=num_samples,
        input_errors={p: np.mean(np.asarray(errors[p], np.float64), axis=0) for p in paths} if candidates else None,
        method="vmap" if batched_layers is None else "batched",
        outputs=np.asarray(pass_outputs),
    )
