"""Layer types from module paths: ordered (regex → type) rules, first match wins.

Types (METHOD.md §1): `qkv`, `proj`, `fc1`, `fc2`, `embed`, `head`, `other`.
Built-in rules cover Scenic (and everything the converters produce), big_vision, and
Flax ports of timm / Hugging Face ViTs. User rules are tried before the built-in ones.
"""

from __future__ import annotations

import re
from typing import Iterable, Sequence

LAYER_TYPES: tuple[str, ...] = ("qkv", "proj", "fc1", "fc2", "embed", "head", "other")

TypeRule = tuple[str, str]

# Scenic / big_vision / converted layouts: encoderblock_i/MultiHeadDotProductAttention_0/query ...
SCENIC_RULES: tuple[TypeRule, ...] = (
    (r"MultiHeadDotProductAttention_\d+/(query|key|value)$", "qkv"),
    (r"MultiHeadDotProductAttention_\d+/out$", "proj"),
    (r"MlpBlock_\d+/Dense_0$", "fc1"),
    (r"MlpBlock_\d+/Dense_1$", "fc2"),
    (r"^embedding$", "embed"),
    (r"^(pre_logits|output_projection|head)$", "head"),
)

# timm-style names in a Flax port: blocks_3/attn/qkv, attn/proj, mlp/fc1, patch_embed/proj, head.
TIMM_RULES: tuple[TypeRule, ...] = (
    (r"attn/(qkv|q|k|v|query|key|value)$", "qkv"),
    (r"attn/proj$", "proj"),
    (r"mlp/fc1$", "fc1"),
    (r"mlp/fc2$", "fc2"),
    (r"patch_embed/proj$", "embed"),
    (r"(^|/)(head|fc_norm_head)$", "head"),
)

# Hugging Face Flax ViT: vit/encoder/layer/3/attention/attention/query, attention/output/dense, ...
HUGGINGFACE_RULES: tuple[TypeRule, ...] = (
    (r"attention/attention/(query|key|value)$", "qkv"),
    (r"attention/output/dense$", "proj"),
    (r"intermediate/dense$", "fc1"),
    (r"layer/\d+/output/dense$", "fc2"),
    (r"patch_embeddings/projection$", "embed"),
    (r"(^|/)(classifier|pooler/dense)$", "head"),
)

BUILTIN_RULES: tuple[TypeRule, ...] = SCENIC_RULES + TIMM_RULES + HUGGINGFACE_RULES


def check_rules(rules: Iterable[TypeRule]) -> tuple[tuple[re.Pattern[str], str], ...]:
    """Compiles (regex, type) rules; raises ValueError naming a bad regex or unknown type."""
    compiled = []
    for rule in rules:
        if not (isinstance(rule, (tuple, list)) and len(rule) == 2):
            raise ValueError(f"a type rule is a (regex, type) pair, got {rule!r}")
        pattern, layer_type = rule
        if layer_type not in LAYER_TYPES:
            raise ValueError(f"unknown layer type {layer_type!r} in rule {rule!r}; types are {LAYER_TYPES}")
        try:
            compiled.append((re.compile(pattern), layer_type))
        except re.error as err:
            raise ValueError(f"bad regex {pattern!r} in type rule: {err}") from None
    return tuple(compiled)


def layer_type(path: str, rules: Sequence[tuple[re.Pattern[str], str]]) -> str:
    """Type of the layer at `path` ('/'-joined): the first rule whose regex `search`es it, else 'other'."""
    for pattern, t in rules:
        if pattern.search(path):
            return t
    return "other"


def attention_group(path: str, layer_type_: str) -> str:
    """Group of a layer: q, k and v of one attention share `<parent>/qkv`; others are their own group."""
    if layer_type_ == "qkv" and "/" in path:
        parent, leaf = path.rsplit("/", 1)
        if leaf in ("query", "key", "value", "q", "k", "v"):
            return f"{parent}/qkv"
    return path
