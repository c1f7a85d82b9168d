"""Modules as `jax.jit` static arguments: hashable clones of modules with unhashable configuration fields.

The calibration passes jit `model.apply` with the module as a static argument, which must be hashable.
Scenic's `ViT` takes `patches: ml_collections.ConfigDict`, which is not: `static_module` gives a clone whose
unhashable fields are frozen (ConfigDict → FrozenConfigDict, dict → FrozenDict, list → tuple). Equal
configurations give equal clones, so the jit caches are shared; the clone runs exactly as the original.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
from flax.core import FrozenDict


def _hashable(value: Any) -> bool:
    try:
        hash(value)
    except TypeError:
        return False
    return True


def frozen_value(value: Any) -> Any:
    """A hashable equivalent of a configuration value (ConfigDict, dict, list), or `value` itself."""
    kind = type(value)
    if kind.__module__.startswith("ml_collections") and kind.__name__ == "ConfigDict":
        from ml_collections import FrozenConfigDict

        return FrozenConfigDict(value)
    if isinstance(value, dict):
        return FrozenDict({k: frozen_value(v) for k, v in value.items()})
    if isinstance(value, list):
        return tuple(frozen_value(v) for v in value)
    return value


def static_module(model: nn.Module) -> nn.Module:
    """`model` when it is hashable, else a clone with its unhashable fields frozen (module docstring).

    Raises:
      TypeError: a field stays unhashable, named with its type.
    """
    if _hashable(model):
        return model
    changes = {}
    for field in dataclasses.fields(model):
        if field.name in ("parent", "name"):
            continue
        value = getattr(model, field.name)
        if not _hashable(value):
            changes[field.name] = frozen_value(value)
            if not _hashable(changes[field.name]):
                raise TypeError(
                    f"{type(model).__name__}.{field.name} is an unhashable {type(value).__name__}; "
                    "jit needs the module hashable (give that field a tuple or a frozen mapping)"
                )
    return model.clone(**changes)
