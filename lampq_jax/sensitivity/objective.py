"""Calibration objectives J: how far the quantized model's outputs are from full precision (METHOD.md §6)."""

from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp

# fn(quantized outputs [N, ...], full-precision outputs [N, ...], labels [N] or None) -> scalar
Objective = Callable[[jax.Array, jax.Array, Optional[jax.Array]], jax.Array]


def kl_objective(q_logits: jax.Array, fp_logits: jax.Array, labels: Optional[jax.Array] = None) -> jax.Array:
    """mean_n KL(p_FP ‖ p_Q) = mean_n Σ_c p_FP,c (log p_FP,c − log p_Q,c) over logits [N, classes]."""
    log_p = jax.nn.log_softmax(fp_logits.astype(jnp.float32), axis=-1)
    log_q = jax.nn.log_softmax(q_logits.astype(jnp.float32), axis=-1)
    return jnp.mean(jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1))


def cross_entropy_objective(q_logits: jax.Array, fp_logits: jax.Array, labels: Optional[jax.Array]) -> jax.Array:
    """mean_n −log p_Q(y_n | x_n) with the given labels [N]."""
    if labels is None:
        raise ValueError("the cross-entropy objective needs labels")
    log_q = jax.nn.log_softmax(q_logits.astype(jnp.float32), axis=-1)
    return -jnp.mean(jnp.take_along_axis(log_q, labels[:, None].astype(jnp.int32), axis=-1))


def cosine_objective(q_features: jax.Array, fp_features: jax.Array, labels: Optional[jax.Array] = None) -> jax.Array:
    """mean_n (1 − cos(f_Q(x_n), f_FP(x_n))) over features [N, ...]."""
    q = q_features.reshape(q_features.shape[0], -1).astype(jnp.float32)
    p = fp_features.reshape(fp_features.shape[0], -1).astype(jnp.float32)
    cos = jnp.sum(q * p, -1) / (jnp.linalg.norm(q, axis=-1) * jnp.linalg.norm(p, axis=-1) + 1e-12)
    return jnp.mean(1.0 - cos)


OBJECTIVES: dict[str, Objective] = {
    "kl": kl_objective,
    "cross_entropy": cross_entropy_objective,
    "cosine": cosine_objective,
}


def objective_name(objective, *, labels_given: bool, output: str) -> str:
    """The name of an objective for reports: the given name, a callable's `__name__`, or the default's name.

    The default (objective None) is 'cosine' for output 'features', else 'cross_entropy' with labels, else 'kl'.
    """
    if callable(objective):
        return getattr(objective, "__name__", type(objective).__name__)
    if objective is None:
        return "cosine" if output == "features" else ("cross_entropy" if labels_given else "kl")
    return objective


def resolve_objective(objective, *, labels_given: bool, output: str) -> Objective:
    """A callable objective from a name ('kl', 'cross_entropy', 'cosine'), a callable, or None (default)."""
    if callable(objective):
        return objective
    objective = objective_name(objective, labels_given=labels_given, output=output)
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; choose one of {sorted(OBJECTIVES)} or pass a callable")
    return OBJECTIVES[objective]
