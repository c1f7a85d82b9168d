"""Activation calibration: per-site statistics over calibration batches, then ranges per bit-width.

Each site's values are subsampled (a fixed stride over the flattened tensor, at most
`max_samples` values a batch) and its exact min / max kept. Ranges are then chosen once per
site and per bit-width b ∈ [2, 8], so any later assignment of bits costs no recalibration:

    minmax:      [min, max]
    percentile:  [q_{1-p}, q_p] of the samples (p = 99.99 % by default)
    mse:         [r·min, r·max] with the shrink ratio r that minimises ‖Q_b(x) − x‖² on the samples

The result is `ActivationParams`: site → array [MAX_BITS + 1, 2] whose row b holds the
(scale, zero_point) of the asymmetric uniform quantizer at b bits (rows 0 and 1 unused, NaN).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Iterable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lampq_jax.apply.sites import site_interceptor
from lampq_jax.quant import MAX_BITS, MIN_BITS, minmax_params, search_clipping_params

ActivationParams = dict[str, np.ndarray]
CALIBRATION_METHODS = ("mse", "percentile", "minmax")


def check_images(images: Any, name: str = "calibration images") -> np.ndarray:
    """Checks a batch of images: a non-empty float array [N, ...] with only finite values."""
    array = np.asarray(images)
    if array.ndim == 0 or array.shape[0] == 0:
        raise ValueError(f"{name} are empty (shape {array.shape}); give at least one image")
    if not np.issubdtype(array.dtype, np.number):
        raise TypeError(f"{name} must be numeric, got dtype {array.dtype}")
    bad = ~np.isfinite(array)
    if bad.any():
        first = np.argwhere(bad)[0]
        raise ValueError(
            f"{name} contain {int(bad.sum())} NaN/Inf value(s), first at index {tuple(int(i) for i in first)}"
        )
    return array


def batches(images: np.ndarray, batch_size: int) -> Iterable[np.ndarray]:
    """Consecutive slices of `images` of at most `batch_size` examples."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for start in range(0, images.shape[0], batch_size):
        yield images[start : start + batch_size]


def _subsample(x: jax.Array, max_samples: int) -> jax.Array:
    flat = jnp.ravel(x).astype(jnp.float32)
    stride = max(1, math.ceil(flat.shape[0] / max_samples))
    return flat[::stride]


@functools.partial(jax.jit, static_argnames=("model", "kwargs", "layer_paths", "attention_paths", "max_samples"))
def _batch_stats(variables, batch, *, model, kwargs, layer_paths, attention_paths, max_samples):
    """{site: (strided samples, min, max)} of one batch; compiled once per model and batch shape."""
    found: dict[str, tuple[jax.Array, jax.Array, jax.Array]] = {}

    def on_site(site, x):
        found[site] = (_subsample(x, max_samples), jnp.min(x), jnp.max(x))
        return x

    with nn.intercept_methods(site_interceptor(on_site, layer_paths=layer_paths, attention_paths=attention_paths)):
        model.apply(variables, batch, **dict(kwargs))
    return found


def collect_site_samples(
    model: nn.Module,
    variables: Any,
    images: np.ndarray,
    *,
    layer_paths: Optional[frozenset[str]] = None,
    attention_paths: Optional[frozenset[str]] = None,
    batch_size: int = 32,
    max_samples: int = 1 << 16,
    **apply_kwargs: Any,
) -> dict[str, tuple[np.ndarray, float, float]]:
    """Runs the full-precision model over `images`; site → (samples [S], min, max)."""
    samples: dict[str, list[np.ndarray]] = {}
    lo: dict[str, float] = {}
    hi: dict[str, float] = {}
    for batch in batches(images, batch_size):
        stats = _batch_stats(variables, batch, model=model, kwargs=tuple(sorted(apply_kwargs.items())),
                             layer_paths=layer_paths, attention_paths=attention_paths, max_samples=max_samples)
        for site, (values, mn, mx) in jax.device_get(stats).items():
            samples.setdefault(site, []).append(values)
            lo[site] = min(lo.get(site, np.inf), float(mn))
            hi[site] = max(hi.get(site, -np.inf), float(mx))
    return {site: (np.concatenate(v), lo[site], hi[site]) for site, v in samples.items()}


def resample(values: np.ndarray, length: int) -> np.ndarray:
    """`length` values spread evenly over `values` (repeating some when there are fewer)."""
    index = np.linspace(0, values.shape[0] - 1, length).round().astype(np.int64)
    return values[index]


@functools.partial(jax.jit, static_argnames=("method",))
def _site_tables(samples: jax.Array, lo: jax.Array, hi: jax.Array, method: str) -> jax.Array:
    """[sites, MAX_BITS + 1, 2] (scale, zero_point) tables from samples [sites, S] and ranges [sites]."""

    def one_site(args):
        values, mn, mx = args
        rows = [jnp.full([2], jnp.nan, jnp.float32)] * MIN_BITS
        for bits in range(MIN_BITS, MAX_BITS + 1):
            if method == "mse":
                params = search_clipping_params(values, bits)
            else:
                params = minmax_params(jnp.stack([mn, mx]), bits)
            rows.append(jnp.stack([jnp.ravel(params.scale)[0], jnp.ravel(params.zero_point)[0]]))
        return jnp.stack(rows)

    return jax.lax.map(one_site, (samples, lo, hi))


def calibrate_activations(
    model: nn.Module,
    variables: Any,
    images: Any,
    *,
    method: str = "mse",
    percentile: float = 99.99,
    layer_paths: Optional[frozenset[str]] = None,
    attention_paths: Optional[frozenset[str]] = None,
    batch_size: int = 32,
    max_samples: int = 1 << 14,
    **apply_kwargs: Any,
) -> ActivationParams:
    """Calibrates every site's activation quantizer at every bit-width from 2 to 8.

    Args:
      model, variables: the full-precision flax.linen model and its variables.
      images: calibration inputs [N, ...] (finite values, N ≥ 1).
      method: 'mse' (default), 'percentile' or 'minmax'; see the module docstring.
      layer_paths, attention_paths: sites to calibrate (None: all).
      **apply_kwargs: passed to `model.apply`, e.g. `train=False`.

    Returns:
      site → [MAX_BITS + 1, 2] float32 (scale, zero_point) per bit-width.
    """
    if method not in CALIBRATION_METHODS:
        raise ValueError(f"unknown calibration method {method!r}; choose one of {CALIBRATION_METHODS}")
    if not 50.0 < percentile <= 100.0:
        raise ValueError(f"percentile must be in (50, 100], got {percentile}")
    images = check_images(images)
    found = collect_site_samples(
        model,
        variables,
        images,
        layer_paths=layer_paths,
        attention_paths=attention_paths,
        batch_size=batch_size,
        max_samples=max_samples,
        **apply_kwargs,
    )
    sites = sorted(found)
    samples = np.stack([resample(found[s][0], max_samples) for s in sites])
    if method == "percentile":
        lo, hi = np.percentile(samples, [100.0 - percentile, percentile], axis=1)
    else:
        lo = np.array([found[s][1] for s in sites], np.float32)
        hi = np.array([found[s][2] for s in sites], np.float32)
    tables = np.asarray(_site_tables(samples, lo.astype(np.float32), hi.astype(np.float32), method))
    return dict(zip(sites, tables))
