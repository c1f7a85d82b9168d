"""What a run quantizes: its layers by type, the layers no rule typed, and the attention matmul sites.

A user of a model the built-in rules do not know needs to see what "W4A4" covers: which layers got
which type, which were left as 'other', and whether the attention matmuls (q·kᵀ and softmax·v) are
quantized at all. They are only where the model calls `nn.MultiHeadDotProductAttention`; attention
written by hand with `jnp.einsum` has no module to intercept, so its matmuls stay in float.

Example:
    >>> coverage = quantization_coverage(layers, attention_paths, rules=[(r"fc1$", "fc1")])
    >>> print("\\n".join(coverage_lines(coverage)))
"""

from __future__ import annotations

from typing import Any, Sequence

from lampq_jax.layers.discovery import Layer
from lampq_jax.layers.types import LAYER_TYPES, TypeRule, check_rules

NO_ATTENTION_LINE = "attention matmuls are not quantized: no nn.MultiHeadDotProductAttention or nn.Einsum found"
ATTENTION_SITES: tuple[str, ...] = ("q", "k", "v", "softmax")


def quantization_coverage(
    layers: Sequence[Layer], attention_paths: Sequence[str], rules: Sequence[TypeRule] = ()
) -> dict[str, Any]:
    """A JSON-serializable summary of what a run quantizes.

    Args:
      layers: the discovered layers (`find_layers`).
      attention_paths: paths of the nn.MultiHeadDotProductAttention modules the model calls.
      rules: the user's (regex, type) rules the layers were typed with (checked here too).

    Returns:
      {"layers_by_type": {type: [path, ...]} in `LAYER_TYPES` order (types present only),
       "other_layers": [path, ...] (type 'other'),
       "attention_sites": [f"{attention path}/{site}" for site in q, k, v, softmax],
       "type_rules": [[regex, type], ...]}
    """
    check_rules(rules)
    by_type = {t: [l.path for l in layers if l.type == t] for t in LAYER_TYPES}
    return {
        "layers_by_type": {t: paths for t, paths in by_type.items() if paths},
        "other_layers": by_type["other"],
        "attention_sites": [f"{p}/{site}" for p in attention_paths for site in ATTENTION_SITES],
        "type_rules": [[pattern, t] for pattern, t in rules],
    }


def _listed(paths: Sequence[str], limit: int) -> str:
    return ", ".join(paths[:limit]) + (f", ... ({len(paths) - limit} more)" if len(paths) > limit else "")


def coverage_lines(coverage: dict[str, Any], limit: int = 8) -> list[str]:
    """Plain-text lines of a `quantization_coverage` summary: one for types, 'other' layers, attention, rules.

    Example output:
        layers by type: qkv 6, proj 2, fc1 2, fc2 2, embed 1 (13 layers)
        layers left as 'other': none
        attention matmuls are not quantized: no nn.MultiHeadDotProductAttention or nn.Einsum found
        type rules: user rules [('fc1$', 'fc1')] tried before the built-in ones
    """
    by_type = coverage["layers_by_type"]
    total = sum(len(p) for p in by_type.values())
    lines = ["layers by type: " + ", ".join(f"{t} {len(p)}" for t, p in by_type.items()) + f" ({total} layers)"]
    other = coverage["other_layers"]
    if other:
        lines.append(
            f"layers left as 'other' (no type rule matched; one type for all of them in the metric): "
            f"{len(other)}: {_listed(other, limit)}"
        )
    else:
        lines.append("layers left as 'other': none")
    sites = coverage["attention_sites"]
    if sites:
        paths = list(dict.fromkeys(s.rsplit("/", 1)[0] for s in sites))
        lines.append(
            f"attention matmuls quantized at {len(sites)} sites ({', '.join(ATTENTION_SITES)} of "
            f"{len(paths)} nn.MultiHeadDotProductAttention): {_listed(paths, limit)}"
        )
    else:
        lines.append(NO_ATTENTION_LINE)
    rules = [tuple(r) for r in coverage["type_rules"]]
    lines.append(
        f"type rules: user rules {rules} tried before the built-in ones"
        if rules
        else "type rules: built-in only (Scenic, big_vision, timm, Hugging Face)"
    )
    return lines
