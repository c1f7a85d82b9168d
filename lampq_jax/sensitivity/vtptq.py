"""VT-PTQ-style sensitivity (a baseline, METHOD.md §10): nuclear norm of a layer's output × its perturbation.

For layer i with input X_n and output Y_n = X_n W_i (per sample, tokens × features):

    Ω^VT_i(b) = mean_n ‖Y_n‖_* · ‖Q_b(X_n) Q_b(W_i) − X_n W_i‖²_F

Only Dense / DenseGeneral layers are measured (the layers that get bits); other kinds raise.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lampq_jax.apply.calibration import ActivationParams, batches
from lampq_jax.apply.fake import layer_kernels, quantize_kernel
from lampq_jax.layers.discovery import Layer, layer_kind, module_path
from lampq_jax.quant import UniformParams, fake_quant


def _contract(module: nn.Module, x: jax.Array, kernel: jax.Array) -> jax.Array:
    """x · W over the module's input axes: Dense contracts x's last axis, DenseGeneral its `axis`."""
    if isinstance(module, nn.DenseGeneral):
        axes = module.axis if isinstance(module.axis, Sequence) else (module.axis,)
        axes = tuple(a % x.ndim for a in axes)
        return jnp.tensordot(x, kernel, axes=(axes, tuple(range(len(axes)))))
    return jnp.tensordot(x, kernel, axes=((x.ndim - 1,), (0,)))


def _nuclear_norms(y: jax.Array) -> jax.Array:
    """[batch] ‖Y_n‖_* with Y_n flattened to [tokens, features]."""
    flat = y.reshape(y.shape[0], -1, y.shape[-1]) if y.ndim > 2 else y[:, None, :]
    return jnp.sum(jnp.linalg.svd(flat.astype(jnp.float32), compute_uv=False), axis=-1)


def vtptq_metric(
    model: nn.Module,
    variables: Any,
    images: np.ndarray,
    layers: Sequence[Layer],
    act_params: ActivationParams,
    candidates: Sequence[int],
    *,
    batch_size: int = 32,
    **apply_kwargs: Any,
) -> np.ndarray:
    """[layers, candidates] Ω^VT_i(b) over the calibration images (full-precision inputs)."""
    bad = [l.path for l in layers if l.kind not in ("dense", "dense_general")]
    if bad:
        raise ValueError(f"the VT-PTQ metric handles Dense / DenseGeneral layers only, not {bad[:5]}")
    wanted = {l.path: l for l in layers}
    kernels = layer_kernels(variables, list(wanted))
    qkernels = {l.path: [quantize_kernel(kernels[l.path], b, tuple(l.out_axes)) for b in candidates] for l in layers}

    @jax.jit
    def batch_metric(variables, qkernels, batch):
        found = {}

        def interceptor(next_fun, args, kwargs, context):
            module = context.module
            if context.method_name == "__call__" and layer_kind(module) and args:
                path = module_path(module)
                if path in wanted:
                    x = args[0]
                    kernel = module.get_variable("params", "kernel")
                    y = _contract(module, x, kernel)
                    nuc = _nuclear_norms(y)
                    table = jnp.asarray(act_params[path])
                    rows = []
                    for c, b in enumerate(candidates):
                        xq = fake_quant(x, UniformParams(table[b, 0], table[b, 1]), b)
                        diff = _contract(module, xq, qkernels[path][c]) - y
                        per_sample = jnp.sum(jnp.square(diff).reshape(diff.shape[0], -1), axis=-1)
                        rows.append(jnp.sum(nuc * per_sample))
                    found[path] = jnp.stack(rows)
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(interceptor):
            model.apply(variables, batch, **apply_kwargs)
        return found

    total = {p: np.zeros(len(candidates)) for p in wanted}
    for batch in batches(images, batch_size):
        for path, values in jax.device_get(batch_metric(variables, qkernels, batch)).items():
            total[path] += values
    return np.stack([total[l.path] / images.shape[0] for l in layers])
