"""Activation calibration: per-site statistics over calibration batches, then ranges per bit-width.

Each site's values are subsampled (a fixed stride over the flattened tensor, at most
`max_samples` values a batch) and its exact min / max kept. Ranges are then chosen once per
site and per bit-width b ∈ [2, 8], so any later assignment of bits costs no recalibration:

    minmax:      [min, max]
    percentile:  [q_{1-p}, q_p] of the samples (p = 99.99 % by default)
    mse:         [r·min, r·max] with the shrink ratio r that minimises ‖Q_b(x) − x‖² on the samples

The result is `ActivationParams`: site → array [MAX_BITS + 1, 2] whose row b holds the
(scale, zero_point) of the asymmetric uniform quantizer at b bits (rows 0 and 1 unused, NaN).

Per-channel sites (`channel_sites`: {site: n}, layer inputs whose last n axes are the layer's input
axes) get [MAX_BITS + 1, 2, *channels] instead, channels = the input's last n dims ([C] for a Dense,
[heads, head_dim] for the output projection of an attention): channel c has its own range
[r·min_c, r·max_c] (exact min / max over the calibration set; for 'mse' one shrink ratio r per site
and bit-width, chosen on sampled rows). Quantizing post-LayerNorm inputs so is what RepQ-ViT's scale
reparameterization makes exact with a per-tensor quantizer; a per-channel scale of the attention
output folds exactly into the value and output projections; post-GELU inputs of fc2 carry
DINOv2-style outlier channels. Every consumer indexes `table[b, 0]` and `table[b, 1]`, which
broadcast against x [..., *channels].

`minmax_sites` are calibrated with 'minmax' whatever the method: the inputs of q·kᵀ by default
(`attention_minmax_sites`). A clipping search on q or k minimises their own squared error, yet clips
the few keys and queries with the largest logits (DINOv2's attention sinks); on the real DINOv2-S/14
(32 / 32 crops, uniform, keys centered) min-max q and k raise the class-token cosine from 0.9937 to
0.9982 at W8A8 and from 0.9747 to 0.9883 at W6A6 (`benchmarks/bench_real_vit_parts.py`).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from lampq_jax.apply.compiled import compiled
from lampq_jax.apply.data_parallel import replicate, resolve_mesh, shard_batch
from lampq_jax.apply.sites import site_interceptor
from lampq_jax.apply.static import static_module
from lampq_jax.quant import MAX_BITS, MIN_BITS, UniformParams, fake_quant, minmax_params, search_clipping_params
from lampq_jax.quant.clipping import DEFAULT_CLIP_RATIOS
from lampq_jax.quant.uniform import fake_quant_levels, range_params

ActivationParams = dict[str, np.ndarray]
# Per bit-width b (the index), the channel-quantile q that floors each per-channel range:
# min_c ≤ quantile_{1−q}(min), max_c ≥ quantile_q(max). A calibration set leaves some post-GELU channels
# silent (max ≈ 0) that wake up on other images and would be clipped there. Measured on the real
# DINOv2-S/14 (16 calibration / 16 evaluation crops, class-token cosine): with no floor W8A8 0.949 and
# W4A4 0.790; q = 0.9 at every width W8A8 0.997 but W4A4 0.763; q = 0.5 W8A8 0.990, W4A4 0.783. Ranges
# are cheap at high bits and dear at low bits, hence no floor up to 4 bits, 0.5 at 5, 0.9 from 6.
CHANNEL_RANGE_FLOOR: tuple[float, ...] = (0.0, 0.0, 0.0, 0.0, 0.0, 0.5, 0.9, 0.9, 0.9)
CALIBRATION_METHODS = ("mse", "percentile", "minmax")
# A channel whose calibrated max (min) is below this fraction of the median channel's max (above it, for
# the min) is "silent": post-GELU channels that stay below 0 on every calibration image, yet reach 0.3–2.5
# on other photos (DINOv2-S/14 fc2 inputs: ~450 of 1,536 channels per block exceed their calibrated max on
# held-out crops). Their range is widened to the median channel's at every bit-width. Measured: class-token
# cosine at W4A4 0.808 without it, 0.839 with it (16 / 16 crops, bench_real_vit_parts); over 3 draws of 32 / 32
# crops, held-out 1 − cos over 0.2's with 0.05 / 0.5 / 1.0: 1.01 / 1.07 / 1.09 at W4A4 and 1.02 / 0.97 / 1.01 at
# W3A3 (bench_real_vit_silent).
SILENT_CHANNEL = 0.2
CHANNEL_ROWS = 256  # tokens a batch keeps for a per-channel site's clipping search


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


def input_errors(x: jax.Array, table: jax.Array, candidates: Sequence[int]) -> jax.Array:
    """[batch, candidates] ‖Q_b(x_n) − x_n‖² of each sample x_n of `x` [batch, ...] at each candidate b, with
    its site's calibrated `table` [MAX_BITS + 1, 2, ...] (scale, zero point by bits); summed in float32."""
    per_sample = lambda e: jnp.sum(e.astype(jnp.float32), axis=tuple(range(1, e.ndim)))
    quantized = lambda b: fake_quant(x, UniformParams(table[b, 0], table[b, 1]), b)
    return jnp.stack([per_sample(jnp.square(quantized(b) - x)) for b in candidates], axis=-1)


def batches(images: np.ndarray, batch_size: int, mesh: Optional[Mesh] = None) -> Iterable[Any]:
    """Consecutive slices of `images` of at most `batch_size` examples, each split over `mesh` (None: not
    split; `data_parallel.shard_batch`)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for start in range(0, images.shape[0], batch_size):
        yield shard_batch(images[start : start + batch_size], mesh)


def batched_outputs(fn: Any, images: np.ndarray, batch_size: int, mesh: Optional[Mesh] = None) -> np.ndarray:
    """`fn`'s outputs on `images`, `batch_size` at a time (each batch split over `mesh`), concatenated on the host."""
    return np.concatenate([np.asarray(fn(b)) for b in batches(images, batch_size, mesh)])


def per_batch(
    batch_fn: Any,
    model: nn.Module,
    args: tuple,
    images: np.ndarray,
    batch_size: int,
    mesh: Optional[Mesh],
    apply_kwargs: Mapping[str, Any],
    *,
    split: bool = True,
    **static: Any,
) -> Iterable[Any]:
    """Host copies of `batch_fn(*args, batch, model=, kwargs=, **static)`, one per batch of `images`.

    `batch_fn` is a one-batch pass, jitted here by `compiled` with `model` (made hashable by `static_module`),
    `kwargs` (the sorted `apply_kwargs`) and `static` fixed. With `split`, `args` are replicated and each batch is split over `mesh`
    (None: all devices; `data_parallel`); without, everything stays on one device.
    """
    if split:
        mesh = resolve_mesh(mesh)
        args = replicate(tuple(args), mesh)
    run = compiled(batch_fn, static_module(model), tuple(sorted(dict(apply_kwargs).items())), **static)
    for batch in batches(images, batch_size, mesh if split else None):
        yield jax.device_get(run(*args, batch))


def intercepted_apply(model, variables, batch, kwargs, on_site, *, layer_paths, attention_paths) -> Any:
    """model.apply(variables, batch, **dict(kwargs)) with `on_site(site, x) → x` called at every site
    (`sites.site_interceptor`) of `layer_paths` and `attention_paths`."""
    with nn.intercept_methods(site_interceptor(on_site, layer_paths=layer_paths, attention_paths=attention_paths)):
        return model.apply(variables, batch, **dict(kwargs))


def _subsample(x: jax.Array, max_samples: int) -> jax.Array:
    flat = jnp.ravel(x).astype(jnp.float32)
    stride = max(1, math.ceil(flat.shape[0] / max_samples))
    return flat[::stride]


def _subsample_rows(x: jax.Array, max_rows: int) -> jax.Array:
    """Every k-th row (token) of x [..., C] as [rows, C], at most `max_rows` rows."""
    rows = jnp.reshape(x, (-1, x.shape[-1])).astype(jnp.float32)
    stride = max(1, math.ceil(rows.shape[0] / max_rows))
    return rows[::stride]


ChannelSites = Mapping[str, int]  # site → number of trailing channel axes of its tensor


def channel_site_map(channel_sites: Union[ChannelSites, Iterable[str]]) -> dict[str, int]:
    """{site: n channel axes}; a plain collection of site names means one channel axis (the last) each.

    Raises:
      ValueError: naming a site whose count is not a positive integer.
    """
    if isinstance(channel_sites, Mapping):
        sites = dict(channel_sites)
    else:
        sites = {s: 1 for s in channel_sites}
    bad = {s: n for s, n in sites.items() if isinstance(n, bool) or not isinstance(n, int) or n < 1}
    if bad:
        raise ValueError(f"channel_sites need a positive number of channel axes per site, got {bad}")
    return sites


def _batch_stats(variables, batch, *, model, kwargs, layer_paths, attention_paths, max_samples, channel_sites):
    """{site: (samples, min, max)} of one batch; per-channel sites ((site, n) pairs) give rows [S, C] and
    min / max of the channel shape (the input's last n dims; C their product)."""
    found: dict[str, tuple[jax.Array, jax.Array, jax.Array]] = {}
    channel_axes = dict(channel_sites)

    def on_site(site, x):
        if site in channel_axes:
            axes = tuple(range(x.ndim - channel_axes[site]))
            rows = jnp.reshape(x, (-1, math.prod(x.shape[x.ndim - channel_axes[site] :])))
            found[site] = (_subsample_rows(rows, CHANNEL_ROWS), jnp.min(x, axis=axes), jnp.max(x, axis=axes))
        else:
            found[site] = (_subsample(x, max_samples), jnp.min(x), jnp.max(x))
        return x

    intercepted_apply(
        model, variables, batch, kwargs, on_site, layer_paths=layer_paths, attention_paths=attention_paths
    )
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
    channel_sites: Union[ChannelSites, Iterable[str]] = frozenset(),
    mesh: Optional[Mesh] = None,
    **apply_kwargs: Any,
) -> dict[str, tuple[np.ndarray, Any, Any]]:
    """Runs the full-precision model over `images`; site → (samples [S], min, max).

    For `channel_sites` {site: n}: (rows [S, C], min [*channels], max [*channels]), channels the
    tensor's last n dims and C their product. Each batch is split over `mesh` (`data_parallel`).
    """
    channel_sites = tuple(sorted(channel_site_map(channel_sites).items()))
    samples: dict[str, list[np.ndarray]] = {}
    lo: dict[str, Any] = {}
    hi: dict[str, Any] = {}
    static = {"layer_paths": layer_paths, "attention_paths": attention_paths, "max_samples": max_samples}
    static["channel_sites"] = channel_sites
    for stats in per_batch(_batch_stats, model, (variables,), images, batch_size, mesh, apply_kwargs, **static):
        for site, (values, mn, mx) in stats.items():
            samples.setdefault(site, []).append(values)
            lo[site] = np.minimum(lo.get(site, np.inf), mn)
            hi[site] = np.maximum(hi.get(site, -np.inf), mx)
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


@functools.partial(jax.jit, static_argnames=("method", "percentile"))
def _channel_table(rows: jax.Array, lo: jax.Array, hi: jax.Array, method: str, percentile: float) -> jax.Array:
    """[MAX_BITS + 1, 2, C] per-channel (scale, zero_point) from rows [S, C] and exact ranges [C]."""
    if method == "percentile":
        lo = jnp.percentile(rows, 100.0 - percentile, axis=0)
        hi = jnp.percentile(rows, percentile, axis=0)
    ratios = jnp.asarray(DEFAULT_CLIP_RATIOS if method == "mse" else (1.0,), jnp.float32)
    table = [jnp.full([2, lo.shape[0]], jnp.nan, jnp.float32)] * MIN_BITS
    # Silent channels: a side whose reach is below SILENT_CHANNEL × the median channel's gets the median's.
    median_lo, median_hi = jnp.median(lo), jnp.median(hi)
    raw_hi = jnp.where(hi < SILENT_CHANNEL * median_hi, jnp.maximum(hi, median_hi), hi)
    raw_lo = jnp.where(lo > SILENT_CHANNEL * median_lo, jnp.minimum(lo, median_lo), lo)
    for bits in range(MIN_BITS, MAX_BITS + 1):
        levels = float(2**bits - 1)
        # Each channel's range is floored by a quantile of all channels' ranges (`CHANNEL_RANGE_FLOOR`).
        floor = CHANNEL_RANGE_FLOOR[bits]
        lo = jnp.minimum(raw_lo, jnp.quantile(raw_lo, 1.0 - floor)) if floor else raw_lo
        hi = jnp.maximum(raw_hi, jnp.quantile(raw_hi, floor)) if floor else raw_hi

        def error(r):
            params = range_params(r * lo, r * hi, levels)
            diff = fake_quant_levels(rows, params.scale, params.zero_point, levels) - rows
            return jnp.sum(diff * diff)

        best = ratios[jnp.argmin(jax.vmap(error)(ratios))]
        params = range_params(best * lo, best * hi, levels)
        table.append(jnp.stack([params.scale, params.zero_point]))
    return jnp.stack(table)


def channel_input_sites(layers: Iterable[Any], types: Iterable[str]) -> dict[str, int]:
    """{path: n} for the layers of `types` whose kernel is [*inputs (n axes), *outputs] and contracts the
    input's last n axes (Dense; DenseGeneral over trailing axes, e.g. an attention's output projection
    over [heads, head_dim]): the sites that `calibrate_activations` can quantize per channel."""
    types = frozenset(types)
    sites = {}
    for l in layers:
        n_in = len(l.weight_shape) - len(l.out_axes)
        if (
            l.type in types
            and l.kind in ("dense", "dense_general")
            and n_in >= 1
            and tuple(l.out_axes) == tuple(range(n_in, len(l.weight_shape)))
        ):
            sites[l.path] = n_in
    return sites


def layer_input_sites(layers: Iterable[Any], types: Iterable[str]) -> frozenset[str]:
    """The input sites (their paths) of the layers of `types`, e.g. the patch embedding's for ('embed',)."""
    types = frozenset(types)
    return frozenset(l.path for l in layers if l.type in types)


def attention_minmax_sites(attention_paths: Iterable[str]) -> frozenset[str]:
    """The q and k sites (the inputs of q·kᵀ) of every attention: calibrated by min-max (module docstring)."""
    return frozenset(f"{p}/{s}" for p in attention_paths for s in ("q", "k"))


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
    channel_sites: Union[ChannelSites, Iterable[str]] = frozenset(),
    minmax_sites: Iterable[str] = frozenset(),
    mesh: Optional[Mesh] = None,
    **apply_kwargs: Any,
) -> ActivationParams:
    """Calibrates every site's activation quantizer at every bit-width from 2 to 8.

    Args:
      model, variables: the full-precision flax.linen model and its variables.
      images: calibration inputs [N, ...] (finite values, N ≥ 1).
      method: 'mse' (default), 'percentile' or 'minmax'; see the module docstring.
      layer_paths, attention_paths: sites to calibrate (None: all).
      channel_sites: {site: n channel axes} (or site names, one axis each) of the layer inputs quantized
        per channel (see `channel_input_sites`).
      minmax_sites: sites calibrated by 'minmax' whatever `method`, per tensor or per channel (see
        `attention_minmax_sites`).
      mesh: the devices the statistics' batches are split over (None: all devices; see `data_parallel`).
      **apply_kwargs: passed to `model.apply`, e.g. `train=False`.

    Returns:
      site → [MAX_BITS + 1, 2] float32 (scale, zero_point) per bit-width; [MAX_BITS + 1, 2, *channels]
      for `channel_sites`.
    """
    if method not in CALIBRATION_METHODS:
        raise ValueError(f"unknown calibration method {method!r}; choose one of {CALIBRATION_METHODS}")
    if not 50.0 < percentile <= 100.0:
        raise ValueError(f"percentile must be in (50, 100], got {percentile}")
    images = check_images(images)
    channel_sites = channel_site_map(channel_sites)
    found = collect_site_samples(
        model,
        variables,
        images,
        layer_paths=layer_paths,
        attention_paths=attention_paths,
        batch_size=batch_size,
        max_samples=max_samples,
        channel_sites=channel_sites,
        mesh=mesh,
        **apply_kwargs,
    )
    unknown = sorted(set(channel_sites) - set(found))
    if unknown:
        raise ValueError(f"channel_sites {unknown[:5]} are not layer inputs of the model")
    minmax_sites = frozenset(minmax_sites)
    unknown = sorted(minmax_sites - set(found))
    if unknown:
        raise ValueError(f"minmax_sites {unknown[:5]} are not quantization sites of the model")
    channel = {}
    for s in sorted(channel_sites):
        rows, mn, mx = found[s]
        shape = np.shape(mn)
        table = _channel_table(
            jnp.asarray(rows),
            jnp.asarray(mn, jnp.float32).ravel(),
            jnp.asarray(mx, jnp.float32).ravel(),
            "minmax" if s in minmax_sites else method,
            float(percentile),
        )
        channel[s] = np.asarray(table).reshape(table.shape[:2] + shape)
    tables = dict(channel)
    for site_method in CALIBRATION_METHODS:
        sites = sorted(
            s for s in found if s not in channel and ("minmax" if s in minmax_sites else method) == site_method
        )
        if sites:
            tables.update(_per_tensor_tables(found, sites, site_method, percentile, max_samples))
    return tables


def _per_tensor_tables(found, sites: list[str], method: str, percentile: float, max_samples: int) -> ActivationParams:
    """{site: [MAX_BITS + 1, 2]} of per-tensor sites from their (samples, min, max), all by one `method`."""
    samples = np.stack([resample(found[s][0], max_samples) for s in sites])
    if method == "percentile":
        lo, hi = np.percentile(samples, [100.0 - percentile, percentile], axis=1)
    else:
        lo = np.array([found[s][1] for s in sites], np.float32)
        hi = np.array([found[s][2] for s in sites], np.float32)
    tables = np.asarray(_site_tables(samples, lo.astype(np.float32), hi.astype(np.float32), method))
    return dict(zip(sites, tables))
