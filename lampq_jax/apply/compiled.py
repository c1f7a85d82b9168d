"""The one place where passes over a model are jitted: a bounded, clearable table of compiled passes.

A pass is a pure function `pass_fn(*arrays, model, kwargs, **static)`: `model` a hashable flax module
(`static.static_module`), `kwargs` the sorted `model.apply` keyword pairs, `static` hashable options.

    compiled(pass_fn, model, kwargs, **static) = jax.jit(partial(pass_fn, model=model, kwargs=kwargs, **static))

Each distinct (pass_fn, model, kwargs, static) gets one jitted function, so a pass compiles once per model
and input shape and is reused by later calls (the rounds of a LampQ run, several `quantize` calls on one
model). The table keeps the `CAPACITY` most recently used entries. An entry that drops out of it, or
`clear()`, releases the jitted function, and with it jax's compiled code and the reference to the model:
no module-level `jax.jit` in the library takes a model as a static argument.
"""

from __future__ import annotations

import collections
import functools
from typing import Any, Callable

import flax.linen as nn
import jax

CAPACITY = 64

_table: collections.OrderedDict[tuple, Callable[..., Any]] = collections.OrderedDict()


def compiled(pass_fn: Callable[..., Any], model: nn.Module, kwargs: tuple, **static: Any) -> Callable[..., Any]:
    """`jax.jit(partial(pass_fn, model=model, kwargs=kwargs, **static))`, from the table when it is there.

    Raises:
      TypeError: `model`, `kwargs` or a static value is not hashable, named.
    """
    key = (pass_fn, model, kwargs, tuple(sorted(static.items())))
    try:
        hash(key)
    except TypeError as error:
        raise TypeError(
            f"{getattr(pass_fn, '__name__', pass_fn)} needs a hashable model, kwargs and static options ({error})"
        ) from None
    if key in _table:
        _table.move_to_end(key)
        return _table[key]
    jitted = jax.jit(functools.partial(pass_fn, model=model, kwargs=kwargs, **static))
    _table[key] = jitted
    while len(_table) > CAPACITY:
        _table.popitem(last=False)
    return jitted


def clear() -> None:
    """Drops every compiled pass (and the models they hold); later passes compile again."""
    _table.clear()


def size() -> int:
    """How many compiled passes the table holds."""
    return len(_table)
