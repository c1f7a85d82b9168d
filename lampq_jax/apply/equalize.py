"""Exact reparameterizations of an attention's query / key projections: key centering and equalization.

Key centering. Softmax over the keys does not change when every key moves by the same vector μ:
q·(k_j − μ) = q·k_j − q·μ, a constant over j for each query. With μ = the mean key over the
calibration set (per head and channel), folded into the `key` projection's bias (bias − μ), the float
model is unchanged and k loses its constant part. DINOv2-S/14's keys carry such channels (block 3: one
channel near 36 in every token, where the median channel's range is 4), which set the step of a
per-tensor quantizer of all the others. Measured on the real DINOv2-S/14 (16 / 16 crops, q and k alone
at 4 bits, the rest in float): class-token cosine 0.904 without, 0.952 with centering; uniform W4A4
(32 / 32 crops) 0.801 without, 0.816 with it. On by default (`center_keys=True`).

Query/key equalization: an exact rescaling of the weights that evens out q and k channel ranges.

The attention logits q·kᵀ = Σ_d q_d k_d do not change when channel d of q is multiplied by r_d and
channel d of k divided by it. With

    r_d = sqrt(max_n |k_{n,d}| / max_n |q_{n,d}|)        (over the calibration set; d = (head, dim))

both q and k get the per-channel range sqrt(max|q_d| · max|k_d|), so a few outlier channels of k
(DINOv2's keys reach 19 where the median channel stays near 3) no longer set the step of the
per-tensor quantizer of every other channel. The scaling is folded into the `query` and `key`
projections (kernel columns and bias), so the full-precision model is unchanged (up to float
rounding), per-output-channel weight quantization is unaffected (each column is scaled as a whole),
and the deployed model needs no extra operation: SmoothQuant's migration, applied between q and k.

Off by default (`equalize_qk=False`): on the real DINOv2-S/14 (16 calibration / 16 held-out crops) it
raises the class-token cosine of quantizing q and k alone at 4 bits from 0.904 to 0.934. On top of key
centering and min-max q/k ranges (benchmarks/RESULTS.md, bench_real_vit, 32 / 32 crops) it moves uniform
W4A4 from 0.8424 to 0.8462 but W8A8 from 0.9988 to 0.9983: within noise, so it stays an option.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from flax.traverse_util import flatten_dict, unflatten_dict

from lampq_jax.apply.calibration import intercepted_apply, per_batch

# r_d is kept within [1 / MAX_RATIO, MAX_RATIO], so a channel that is silent in calibration is not blown up.
MAX_RATIO = 100.0


def _query_key_absmax(site: str, x: jax.Array) -> Optional[jax.Array]:
    """max |x| over all but the last two axes [heads, head_dim], at a query or key site."""
    if site.endswith(("/q", "/k")):
        return jnp.max(jnp.abs(x.astype(jnp.float32)), axis=tuple(range(x.ndim - 2)))
    return None


def _key_sums(site: str, x: jax.Array) -> Optional[tuple[jax.Array, int]]:
    """(Σ k over the tokens of each image [batch, heads, head_dim], tokens per image), at a key site."""
    if site.endswith("/k"):
        x = x.astype(jnp.float32)
        return jnp.sum(x, axis=tuple(range(1, x.ndim - 2))), math.prod(x.shape[1:-2])
    return None


def _batch_statistic(variables, batch, *, model, kwargs, attention_paths, at_site):
    """{site: at_site(site, x)} over one batch, for the attention sites where `at_site` is not None."""
    found: dict[str, Any] = {}

    def on_site(site, x):
        value = at_site(site, x)
        if value is not None:
            found[site] = value
        return x

    intercepted_apply(
        model, variables, batch, kwargs, on_site, layer_paths=frozenset(), attention_paths=attention_paths
    )
    return found


def _ratios(batches: Iterable[dict], attention_paths: Sequence[str]) -> dict[str, np.ndarray]:
    """{path: sqrt(max|k| / max|q|)} from per-batch absmax, clipped to [1 / MAX_RATIO, MAX_RATIO]."""
    absmax: dict[str, np.ndarray] = {}
    for found in batches:
        for site, value in found.items():
            absmax[site] = np.maximum(absmax.get(site, 0.0), value)
    ratios = {}
    for path in attention_paths:
        q, k = absmax[f"{path}/q"], absmax[f"{path}/k"]
        ratio = np.sqrt(np.maximum(k, 1e-12) / np.maximum(q, 1e-12))
        ratios[path] = np.clip(ratio, 1.0 / MAX_RATIO, MAX_RATIO).astype(np.float32)
    return ratios


def _means(batches: Iterable[dict], attention_paths: Sequence[str]) -> dict[str, np.ndarray]:
    """{path: μ} from per-batch key sums, added per image in float64 and in image order."""
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    for found in batches:
        for site, (per_image, tokens) in found.items():
            sums[site] = sums.get(site, 0.0) + np.sum(np.asarray(per_image, np.float64), axis=0)
            counts[site] = counts.get(site, 0) + int(tokens) * per_image.shape[0]
    return {p: (sums[f"{p}/k"] / counts[f"{p}/k"]).astype(np.float32) for p in attention_paths}


# statistic → (what a batch gives at a site, how the batches are reduced).
STATISTICS = {"key_means": (_key_sums, _means), "query_key_ratios": (_query_key_absmax, _ratios)}


def attention_statistics(
    model: nn.Module,
    variables: Any,
    images: np.ndarray,
    attention_paths: Sequence[str],
    statistic: str,
    *,
    batch_size: int = 32,
    mesh: Optional[Mesh] = None,
    **apply_kwargs: Any,
) -> dict[str, np.ndarray]:
    """{attention path: [heads, head_dim]} over `images` (batches split over `mesh`, None: all devices):

    - 'key_means': μ, the mean key over every token. Per-image sums are added on the host in float64, in image
      order, so that μ does not depend on how a batch was split (it is folded into the variables that
      everything after uses).
    - 'query_key_ratios': r = sqrt(max|k| / max|q|), clipped to [1/100, 100].
    """
    if statistic not in STATISTICS:
        raise ValueError(f"statistic must be one of {sorted(STATISTICS)}, got {statistic!r}")
    at_site, reduce = STATISTICS[statistic]
    static = {"attention_paths": frozenset(attention_paths), "at_site": at_site}
    batches = per_batch(_batch_statistic, model, (variables,), images, batch_size, mesh, apply_kwargs, **static)
    return reduce(batches, attention_paths)


def fold_query_key_ratios(variables: Any, ratios: dict[str, np.ndarray]) -> Any:
    """`variables` with query kernel/bias × r and key kernel/bias ÷ r (kernels [dim, heads, head_dim])."""
    flat = flatten_dict(dict(variables)["params"], sep="/")
    for path, ratio in ratios.items():
        for name, factor in (("query", ratio), ("key", 1.0 / ratio)):
            for leaf in ("kernel", "bias"):
                key = f"{path}/{name}/{leaf}"
                if key in flat:
                    value = flat[key]
                    if tuple(value.shape[-2:]) != ratio.shape:
                        raise ValueError(
                            f"{key} has shape {tuple(value.shape)}, which does not end in the "
                            f"[heads, head_dim] = {ratio.shape} of its attention"
                        )
                    flat[key] = (jnp.asarray(value, jnp.float32) * factor).astype(value.dtype)
                elif leaf == "kernel":
                    raise ValueError(f"attention {path!r} has no {name} kernel at 'params/{key}'")
    return {**dict(variables), "params": unflatten_dict(flat, sep="/")}


def fold_key_means(variables: Any, means: dict[str, np.ndarray]) -> tuple[Any, list[str]]:
    """(`variables` with each key bias − μ, the attention paths whose key has no bias and stay unchanged).

    Raises:
      ValueError: an attention without a key kernel, or a bias that does not end in μ's [heads, head_dim].
    """
    flat = flatten_dict(dict(variables)["params"], sep="/")
    without_bias = []
    for path, mean in means.items():
        if f"{path}/key/kernel" not in flat:
            raise ValueError(f"attention {path!r} has no key kernel at 'params/{path}/key/kernel'")
        key = f"{path}/key/bias"
        if key not in flat:
            without_bias.append(path)
            continue
        bias = flat[key]
        if tuple(bias.shape[-2:]) != mean.shape:
            raise ValueError(
                f"{key} has shape {tuple(bias.shape)}, which does not end in the "
                f"[heads, head_dim] = {mean.shape} of its keys"
            )
        flat[key] = (jnp.asarray(bias, jnp.float32) - mean).astype(bias.dtype)
    return {**dict(variables), "params": unflatten_dict(flat, sep="/")}, without_bias
