"""Second moments of layer inputs, H_i = X_iᵀ X_i / n, for GPTQ weight rounding (`lampq_jax.quant.gptq`).

X_i [n, in] stacks every token of the calibration set that enters layer i (the full-precision
model's inputs), flattened over the layer's input axes: [C] for a Dense, [heads · head_dim] for an
attention's output projection. Only layers whose kernel is [*inputs, *outputs] and contract the
input's trailing axes have one (`channel_input_sites`); convolutions and einsums keep RTN.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lampq_jax.apply.calibration import channel_input_sites, intercepted_apply, per_batch
from lampq_jax.layers.discovery import Layer
from lampq_jax.layers.types import LAYER_TYPES


def _batch_grams(variables, batch, *, model, kwargs, input_axes):
    """{path: (Σ xxᵀ [in, in], number of rows)} of one batch; input_axes: ((path, n input axes), ...)."""
    axes = dict(input_axes)
    found: dict[str, tuple[jax.Array, int]] = {}

    def on_site(site, x):
        if site in axes:
            rows = jnp.reshape(x, (-1, math.prod(x.shape[x.ndim - axes[site] :]))).astype(jnp.float32)
            gram, count = found.get(site, (0.0, 0))  # a layer called twice adds both inputs
            found[site] = (gram + rows.T @ rows, count + rows.shape[0])
        return x

    intercepted_apply(
        model, variables, batch, kwargs, on_site, layer_paths=frozenset(axes), attention_paths=frozenset()
    )
    return found


def input_hessians(
    model: nn.Module,
    variables: Any,
    images: np.ndarray,
    layers: Sequence[Layer],
    *,
    batch_size: int = 32,
    **apply_kwargs: Any,
) -> dict[str, np.ndarray]:
    """{path: H [in, in] float32} = mean of x xᵀ over every input row of the layers that GPTQ can round.

    Args:
      model, variables: the full-precision model.
      images: calibration inputs [N, ...].
      layers: the layers to cover; those that are not [*inputs, *outputs] Dense / DenseGeneral are left out.

    Runs on one device even when several are there (unlike the other calibration passes, `data_parallel`):
    GPTQ rounds column after column with error feedback, so a sum of H reassociated over devices (~1e-7
    relative) changes some codes, and the rest after them.
    """
    input_axes = channel_input_sites(layers, LAYER_TYPES)
    if not input_axes:
        return {}
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    static = {"split": False, "input_axes": tuple(sorted(input_axes.items()))}
    for found in per_batch(_batch_grams, model, (variables,), images, batch_size, None, apply_kwargs, **static):
        for path, (gram, rows) in found.items():
            sums[path] = sums.get(path, 0.0) + np.asarray(gram, np.float64)
            counts[path] = counts.get(path, 0) + int(rows)
    return {p: (sums[p] / counts[p]).astype(np.float32) for p in sums}
