"""Zero-shot calibration (METHOD.md §7): images synthesized from the full-precision model alone.

PSAQ-ViT style. Adam (optax) optimizes the pixels x [N, H, W, C] (model-input space, i.e. after the
model's normalization) to minimize

    L(x) = − w_H · mean_blocks mean_images H(patch similarities of the block's attention output)
           + w_CE · CE(model(x), random labels)          (output='logits' only)
           + w_TV · TV(x)

on randomly jittered and flipped views, one jitted step per iteration for a whole group of images.
The entropy term pushes every attention block towards diverse, real-image-like token features; the
cross-entropy makes each image look like its (random, balanced) class to the model; the TV prior keeps
neighbouring pixels close.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

OUTPUTS = ("logits", "features")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ZeroShotConfig:
    """How `quantize(..., zero_shot=...)` synthesizes its calibration images (`synthesize_calibration`).

    Attributes:
      image_shape: one model input without the batch axis, e.g. (224, 224, 3) (NHWC models).
      num_images: images to synthesize.
      steps: Adam steps per group of images.
      lr: Adam learning rate (pixels are in the model's normalized input space).
      entropy_weight, ce_weight, tv_weight: w_H, w_CE, w_TV of the loss.
      jitter: largest random shift in pixels (each axis, per step, whole group); 0 for none.
      flip: random horizontal flips (per image, per step).
      pixel_range: (low, high) the pixels are clipped to after each step, e.g. the normalized image of
        [0, 1]; None for no clipping.
      kde_points: grid points of the similarity density on [−1, 1].
      group_size: images optimized together in one step (memory); groups run one after another.
      output: 'logits' (CE term) or 'features'; None: the quantizer's (`LampQConfig.output`; 'logits' for
        `quantize_uniform`).
      seed: the synthesis rng.
      progress: show a progress bar.
    """

    image_shape: Optional[tuple[int, ...]] = None
    num_images: int = 32
    steps: int = 200
    lr: float = 0.1
    entropy_weight: float = 1.0
    ce_weight: float = 1.0
    tv_weight: float = 1.0
    jitter: int = 2
    flip: bool = True
    pixel_range: Optional[tuple[float, float]] = None
    kde_points: int = 64
    group_size: int = 32
    output: Optional[str] = None
    seed: int = 0
    progress: bool = True


# ----------------------------------------------------------------------------- the loss's pieces


def patch_similarity_entropy(tokens: jax.Array, *, kde_points: int = 64) -> jax.Array:
    """Differential entropy of the cosine similarities between the tokens of each image.

    With s_k = cos(t_i, t_j) over the pairs i < j (n = T(T−1)/2), a Gaussian kernel density
    f(u) = 1/(n h) Σ_k φ((u − s_k)/h) on a grid u_1..u_M over [−1, 1] (spacing Δu), Silverman's bandwidth
    h = max(1.06 σ(s) n^(−1/5), 1e-3) (not differentiated), and H = − Σ_m f(u_m) log f(u_m) Δu.
    Identical tokens give a spike (low H); diverse tokens a spread density (high H, at most log 2).

    Args:
      tokens: [batch, tokens, dim], tokens ≥ 2.
      kde_points: M.

    Returns:
      [batch] entropies.
    """
    if tokens.ndim != 3 or tokens.shape[1] < 2:
        raise ValueError(f"tokens must be [batch, tokens >= 2, dim], got shape {tokens.shape}")
    t = tokens.astype(jnp.float32)
    t = t / jnp.sqrt(jnp.sum(t * t, -1, keepdims=True) + 1e-12)
    sims = jnp.einsum("bid,bjd->bij", t, t)
    upper_i, upper_j = np.triu_indices(tokens.shape[1], k=1)
    s = sims[:, upper_i, upper_j]  # [batch, n]
    n = s.shape[1]
    h = jax.lax.stop_gradient(jnp.maximum(1.06 * jnp.std(s, -1) * n ** (-0.2), 1e-3))  # [batch]
    grid = jnp.linspace(-1.0, 1.0, kde_points)
    z = (grid[None, :, None] - s[:, None, :]) / h[:, None, None]  # [batch, M, n]
    density = jnp.mean(jnp.exp(-0.5 * z * z), -1) / (h[:, None] * np.sqrt(2 * np.pi))  # [batch, M]
    delta = 2.0 / (kde_points - 1)
    return -jnp.sum(density * jnp.log(density + 1e-12), -1) * delta


def total_variation(images: jax.Array) -> jax.Array:
    """TV(x) = mean over images of mean (x[h+1, w] − x[h, w])² + mean (x[h, w+1] − x[h, w])²; x: [N, H, W, C]."""
    dh = jnp.mean(jnp.square(images[:, 1:] - images[:, :-1]), axis=(1, 2, 3))
    dw = jnp.mean(jnp.square(images[:, :, 1:] - images[:, :, :-1]), axis=(1, 2, 3))
    return jnp.mean(dh + dw)


def random_view(images: jax.Array, key: jax.Array, *, jitter: int, flip: bool) -> jax.Array:
    """A random view of images [N, H, W, C]: one shift in [−jitter, jitter]² (rolled) and per-image flips."""
    shift_key, flip_key = jax.random.split(key)
    if jitter > 0:
        shift = jax.random.randint(shift_key, (2,), -jitter, jitter + 1)
        images = jnp.roll(images, (shift[0], shift[1]), axis=(1, 2))
    if flip:
        flips = jax.random.bernoulli(flip_key, 0.5, (images.shape[0],))
        images = jnp.where(flips[:, None, None, None], images[:, :, ::-1], images)
    return images


def balanced_labels(key: jax.Array, num_images: int, num_classes: int) -> jax.Array:
    """[num_images] random target labels, every class as often as possible (a permutation of i mod C)."""
    return jax.random.permutation(key, jnp.arange(num_images) % num_classes)


def attention_outputs(
    model: nn.Module, variables: Any, images: jax.Array, **apply_kwargs: Any
) -> tuple[jax.Array, list[jax.Array]]:
    """(model output, [each nn.MultiHeadDotProductAttention's output [N, T, D], in call order])."""
    outputs: list[jax.Array] = []

    def interceptor(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.method_name == "__call__" and isinstance(context.module, nn.MultiHeadDotProductAttention):
            outputs.append(out)
        return out

    with nn.intercept_methods(interceptor):
        result = model.apply(variables, images, **apply_kwargs)
    return result, outputs


def synthesis_loss(
    model: nn.Module,
    variables: Any,
    images: jax.Array,
    labels: Optional[jax.Array],
    *,
    entropy_weight: float,
    ce_weight: float,
    tv_weight: float,
    kde_points: int,
    **apply_kwargs: Any,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(L, {'entropy', 'ce', 'tv'}) of images [N, ...] (see the module docstring); labels None: no CE term."""
    out, blocks = attention_outputs(model, variables, images, **apply_kwargs)
    entropy_fn = jax.checkpoint(lambda t: patch_similarity_entropy(t, kde_points=kde_points))
    entropy = jnp.mean(jnp.stack([jnp.mean(entropy_fn(t)) for t in blocks]))
    ce = jnp.zeros(())
    if labels is not None:
        ce = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(out.astype(jnp.float32), labels))
    tv = total_variation(images)
    loss = -entropy_weight * entropy + ce_weight * ce + tv_weight * tv
    return loss, {"entropy": entropy, "ce": ce, "tv": tv}


# ----------------------------------------------------------------------------- synthesis


def _check_fits(model, variables, image_shape, output, apply_kwargs) -> tuple[int, int]:
    """(number of attention blocks, output width); ValueError naming image_shape if the model rejects it."""
    block_shapes: list[tuple[int, ...]] = []

    def run(v, x):
        out, blocks = attention_outputs(model, v, x, **apply_kwargs)
        block_shapes.extend(b.shape for b in blocks)
        return out

    try:
        out = jax.eval_shape(run, variables, jnp.zeros((2, *image_shape), jnp.float32))
    except Exception as err:  # the model's own shape error, re-raised with the value the user gave
        raise ValueError(
            f"image_shape {tuple(image_shape)} does not fit the model: {type(err).__name__}: {err}"
        ) from err
    if not hasattr(out, "shape") or len(out.shape) != 2:
        raise ValueError(
            f"zero-shot synthesis needs a model output [batch, {output}], got "
            f"{getattr(out, 'shape', type(out).__name__)} for image_shape {tuple(image_shape)}"
        )
    if not block_shapes:
        raise ValueError(
            "the model calls no nn.MultiHeadDotProductAttention, so it has no patch-similarity "
            "entropy to maximize; zero-shot synthesis needs attention blocks"
        )
    for shape in block_shapes:
        if len(shape) != 3 or shape[1] < 2:
            raise ValueError(f"an attention output has shape {shape}; expected [batch, tokens >= 2, dim]")
    return len(block_shapes), int(out.shape[1])


def synthesize_calibration(
    model: nn.Module,
    variables: Any,
    num_images: int,
    image_shape: Sequence[int],
    *,
    steps: int,
    rng: jax.Array,
    optimizer: Optional[optax.GradientTransformation] = None,
    output: str = "logits",
    lr: float = 0.1,
    entropy_weight: float = 1.0,
    ce_weight: float = 1.0,
    tv_weight: float = 1.0,
    jitter: int = 2,
    flip: bool = True,
    pixel_range: Optional[tuple[float, float]] = None,
    kde_points: int = 64,
    group_size: int = 32,
    progress: bool = True,
    callback: Optional[Callable[[int, dict[str, float]], None]] = None,
    **apply_kwargs: Any,
) -> np.ndarray:
    """Calibration images synthesized from the full-precision model alone (PSAQ-ViT style, METHOD.md §7).

    Starts from x ~ N(0, 1) [num_images, *image_shape] and takes `steps` optimizer steps on the loss of
    `synthesis_loss` per group of `group_size` images, each step one jitted call on a random view
    (`random_view`). With output='logits' every image gets a random target class (balanced over the
    model's output width); with 'features' the loss has no cross-entropy term.

    Args:
      model, variables: the full-precision flax.linen model (NHWC input) and its variables.
      num_images: N ≥ 1.
      image_shape: (H, W, C) of one input, in the model's normalized input space.
      steps: optimizer steps per group, ≥ 1.
      rng: a jax PRNG key; the result is a deterministic function of it.
      optimizer: an optax transformation for the pixels (default `optax.adam(lr)`).
      output: 'logits' (a classifier: CE term) or 'features'.
      pixel_range: (low, high) to clip the pixels to after each step.
      callback: called after each step with (step, {'loss', 'entropy', 'ce', 'tv'}) as floats.
      **apply_kwargs: passed to `model.apply`, e.g. `train=False`.

    Returns:
      float32 images [num_images, *image_shape].

    Raises:
      ValueError: steps or num_images < 1, an image_shape the model rejects, a model without attention,
        or a loss / image that is no longer finite (naming the step).
    """
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if isinstance(num_images, bool) or not isinstance(num_images, (int, np.integer)) or num_images < 1:
        raise ValueError(f"num_images must be a positive integer, got {num_images!r}")
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
    image_shape = tuple(int(d) for d in image_shape)
    if len(image_shape) != 3 or min(image_shape) < 1:
        raise ValueError(f"image_shape must be (height, width, channels), got {image_shape}")
    if jitter < 0 or kde_points < 2:
        raise ValueError(f"jitter must be >= 0 and kde_points >= 2, got jitter={jitter}, kde_points={kde_points}")
    if pixel_range is not None and not pixel_range[0] < pixel_range[1]:
        raise ValueError(f"pixel_range must be (low, high) with low < high, got {pixel_range}")
    _, num_classes = _check_fits(model, variables, image_shape, output, apply_kwargs)
    optimizer = optax.adam(lr) if optimizer is None else optimizer
    weights = dict(
        entropy_weight=entropy_weight,
        ce_weight=ce_weight if output == "logits" else 0.0,
        tv_weight=tv_weight,
        kde_points=kde_points,
    )

    def loss_fn(x, labels, key):
        view = random_view(x, key, jitter=jitter, flip=flip)
        return synthesis_loss(model, variables, view, labels if output == "logits" else None, **weights, **apply_kwargs)

    @jax.jit
    def step(x, opt_state, labels, key):
        (loss, parts), grad = jax.value_and_grad(loss_fn, has_aux=True)(x, labels, key)
        updates, opt_state = optimizer.update(grad, opt_state, x)
        x = optax.apply_updates(x, updates)
        if pixel_range is not None:
            x = jnp.clip(x, pixel_range[0], pixel_range[1])
        return x, opt_state, {"loss": loss, **parts}, jnp.all(jnp.isfinite(x))

    init_key, label_key, step_key = jax.random.split(rng, 3)
    images = jax.random.normal(init_key, (num_images, *image_shape), jnp.float32)
    if pixel_range is not None:
        images = jnp.clip(images, pixel_range[0], pixel_range[1])
    labels = balanced_labels(label_key, num_images, num_classes)
    groups = [(s, min(s + group_size, num_images)) for s in range(0, num_images, group_size)]
    done = []
    bar = tqdm(total=steps * len(groups), desc="zero-shot synthesis", disable=not progress, leave=False)
    for g, (start, stop) in enumerate(groups):
        x, group_labels = images[start:stop], labels[start:stop]
        opt_state = optimizer.init(x)
        for k in range(steps):
            x, opt_state, parts, finite = step(x, opt_state, group_labels, jax.random.fold_in(step_key, g * steps + k))
            parts, finite = jax.device_get((parts, finite))
            parts = {name: float(v) for name, v in parts.items()}
            if not (finite and all(np.isfinite(v) for v in parts.values())):
                bar.close()
                raise ValueError(
                    f"zero-shot synthesis diverged at step {k + 1} of {steps} (images {start}–{stop - 1}):"
                    f" loss parts {parts}, pixels finite: {bool(finite)}; lower lr (now {lr}) or the "
                    "loss weights"
                )
            if callback is not None:
                callback(g * steps + k + 1, parts)
            bar.set_postfix(loss=f"{parts['loss']:.3f}", H=f"{parts['entropy']:.3f}")
            bar.update()
        done.append(np.asarray(x))
    bar.close()
    result = np.concatenate(done)
    if not np.isfinite(result).all():
        raise ValueError("zero-shot synthesis produced non-finite pixels")
    return result


def synthesize_from_config(
    model: nn.Module, variables: Any, config: ZeroShotConfig, *, output: str = "logits", **apply_kwargs: Any
) -> np.ndarray:
    """`synthesize_calibration` with the settings of a `ZeroShotConfig` (its `output`, if set, wins)."""
    output = config.output or output
    if config.image_shape is None:
        raise ValueError("ZeroShotConfig.image_shape is required, e.g. ZeroShotConfig(image_shape=(224, 224, 3))")
    return synthesize_calibration(
        model,
        variables,
        config.num_images,
        config.image_shape,
        steps=config.steps,
        rng=jax.random.key(config.seed),
        output=output,
        lr=config.lr,
        entropy_weight=config.entropy_weight,
        ce_weight=config.ce_weight,
        tv_weight=config.tv_weight,
        jitter=config.jitter,
        flip=config.flip,
        pixel_range=config.pixel_range,
        kde_points=config.kde_points,
        group_size=config.group_size,
        progress=config.progress,
        **apply_kwargs,
    )
