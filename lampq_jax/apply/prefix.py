"""The float prefix of a forward pass, reused: a run that quantizes only late layers skips what comes before.

A single-layer probe quantizes one layer group and leaves the rest in float. Every module whose call ends
before the first quantized site starts sees the same input as in the float forward, so its output is the
float one. The *cut modules* are the direct parents of the layers that are called once per forward (a ViT's
attention and MLP blocks). `call_spans` orders their calls and the layers' in one abstract run; `skip_flags`
says which cut modules end before an assignment's first quantized site; `skipping_interceptor` replaces the
call of each cut module m by

    lax.cond(skip[m], lambda: cached[m], lambda: m(x))

so that a skipped module does not run, while one compilation serves every assignment (the flags are traced).
`PrefixRunner` keeps the cut modules' float outputs on a fixed set of images and runs a `DynamicQuantizer`
with them. A probe of the layers of block b then runs the blocks from b on.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from lampq_jax.apply.calibration import batches
from lampq_jax.layers.discovery import module_path

# The cached float outputs of the cut modules are kept only below this size (all calibration images).
MAX_CACHE_BYTES = 2**30


class CallSpans(NamedTuple):
    """Where module calls fall in the event order of one forward (each call start and end is an event).

    Attributes:
      spans: {path: (first start, last end)} of the watched modules the forward calls.
      calls: {path: number of calls}.
      outputs: {path: its output's shapes and dtypes (`jax.ShapeDtypeStruct`s) for one example} of the modules
        called once; the forward's outputs are batch-first.
    """

    spans: dict[str, tuple[int, int]]
    calls: dict[str, int]
    outputs: dict[str, Any]

    def out_bytes(self, path: str) -> int:
        """Bytes of one example's output of `path`."""
        return sum(math.prod(a.shape) * a.dtype.itemsize for a in jax.tree.leaves(self.outputs[path]))

    def placeholders(self, paths, batch: int) -> dict[str, Any]:
        """{path: zeros shaped as its output on `batch` examples}."""
        grow = lambda a: jnp.zeros((batch, *a.shape[1:]), a.dtype)
        return {p: jax.tree.map(grow, self.outputs[p]) for p in paths}


def cut_candidates(layer_paths) -> set[str]:
    """The direct parents of the layers, but the root: the modules a prefix may skip."""
    return {p.rsplit("/", 1)[0] for p in layer_paths if "/" in p}


def call_spans(model: nn.Module, variables: Any, x: Any, watched: frozenset[str], **apply_kwargs: Any) -> CallSpans:
    """The call order of the `watched` module paths in `model.apply(variables, x)` (an abstract run, no compile)."""
    spans: dict[str, tuple[int, int]] = {}
    calls: dict[str, int] = {}
    outputs: dict[str, Any] = {}
    counter = [0]

    def interceptor(next_fun, args, kwargs, context):
        if context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        path = module_path(context.module)
        if path not in watched:
            return next_fun(*args, **kwargs)
        start = counter[0]
        counter[0] += 1
        out = next_fun(*args, **kwargs)
        spans[path] = (spans.get(path, (start, 0))[0], counter[0])
        counter[0] += 1
        calls[path] = calls.get(path, 0) + 1
        outputs[path] = out
        return out

    def run(variables, x):
        with nn.intercept_methods(interceptor):
            model.apply(variables, x, **apply_kwargs)
        return {}

    jax.eval_shape(run, variables, x[:1])
    shapes = {p: jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), o) for p, o in outputs.items()}
    return CallSpans(spans, calls, {p: o for p, o in shapes.items() if calls[p] == 1})


def cut_modules(spans: CallSpans, layer_paths) -> tuple[str, ...]:
    """The cut modules in call order: parents of layers, called once, not inside another cut module."""
    parents = [p for p in cut_candidates(layer_paths) if spans.calls.get(p) == 1]
    outer = [p for p in parents if not any(p.startswith(q + "/") for q in parents)]
    return tuple(sorted(outer, key=lambda p: spans.spans[p][0]))


def skip_flags(
    spans: CallSpans,
    cuts: tuple[str, ...],
    bits: Mapping[str, tuple[int, int]],
    attention_bits: Optional[Mapping[str, int]] = None,
) -> dict[str, bool]:
    """{cut module: whether its call ends before the first quantized site of the assignment starts}.

    Quantized sites: the layers in `bits` with a weight or input width above 0, and the attention modules in
    `attention_bits` above 0. A path the forward does not call is an error naming it.
    """
    quantized = [p for p, (wb, ab) in bits.items() if wb or ab]
    quantized += [p for p, b in (attention_bits or {}).items() if b]
    unknown = sorted(p for p in quantized if p not in spans.spans)
    if unknown:
        raise ValueError(f"the forward does not call module path(s) {unknown[:5]}")
    first = min((spans.spans[p][0] for p in quantized), default=math.inf)
    return {c: bool(spans.spans[c][1] < first) for c in cuts}


def skipping_interceptor(inner, skips: Mapping[str, jax.Array], cached: Mapping[str, Any], record: dict):
    """An interceptor that runs `inner` (another interceptor) for every call, and each cut module in `skips`
    under `lax.cond(skips[path], cached[path], call)`; the cut modules' outputs go into `record`."""

    def interceptor(next_fun, args, kwargs, context):
        call = lambda: inner(next_fun, args, kwargs, context)
        if context.method_name != "__call__":
            return call()
        path = module_path(context.module)
        if path not in skips:
            return call()
        out = jax.lax.cond(skips[path], lambda: cached[path], call)
        record[path] = out
        return out

    return interceptor


@dataclasses.dataclass(eq=False)
class PrefixRunner:
    """Runs a `DynamicQuantizer` on fixed images, skipping the cut modules that end before the first quantized site.

    Attributes:
      quantizer: the `DynamicQuantizer` (its model, variables and cached kernels).
      images: [N, ...] the images every run is on; batch_size: images a batch; mesh: the batches' devices.
      spans, cuts: from `call_spans` and `cut_modules`.

    `float_outputs`, or else the first run that can skip a cut module, computes their float outputs on every batch
    (all sites at 0 bits, nothing skipped) and keeps them: N · Σ_m out_bytes(m) bytes, `MAX_CACHE_BYTES` at most
    (`build`). Runs that skip nothing pass zeros in their place and go through the same compiled forward.
    """

    quantizer: Any
    images: np.ndarray
    batch_size: int
    mesh: Optional[Mesh]
    spans: CallSpans
    cuts: tuple[str, ...]
    _cached: Optional[list[dict[str, Any]]] = dataclasses.field(default=None, repr=False)

    @classmethod
    def build(cls, quantizer, images: np.ndarray, batch_size: int, mesh: Optional[Mesh]) -> Optional["PrefixRunner"]:
        """The runner of `quantizer` on `images`, or None where no cut module exists or the cache would be too big."""
        layer_paths = [l.path for l in quantizer.layers]
        watched = frozenset(layer_paths) | frozenset(quantizer.attention) | frozenset(cut_candidates(layer_paths))
        spans = call_spans(
            quantizer.model, quantizer.variables, jnp.asarray(images[:1]), watched, **quantizer.apply_kwargs
        )
        cuts = cut_modules(spans, layer_paths)
        if not cuts or len(images) * sum(spans.out_bytes(c) for c in cuts) > MAX_CACHE_BYTES:
            return None
        return cls(quantizer, images, batch_size, mesh, spans, cuts)

    def float_outputs(self) -> np.ndarray:
        """[N, ...] the full-precision model's outputs on the images, from the forward that fills the cache (the
        reference of J, so that it costs no forward of its own)."""
        float_run = {c: False for c in self.cuts}
        runs = [
            self.quantizer.apply_skipping(batch, {}, None, float_run, self._placeholders(batch))
            for batch in batches(self.images, self.batch_size, self.mesh)
        ]
        self._cached = [cached for _, cached in runs]
        return np.concatenate([np.asarray(out) for out, _ in runs])

    def outputs(self, bits: Mapping[str, tuple[int, int]], attention_bits: Optional[Mapping[str, int]] = None):
        """[N, ...] the model's outputs on the images under `bits` and `attention_bits`, as `DynamicQuantizer.apply`.

        The first run that can skip a cut module first computes their float outputs (`float_outputs`), unless
        that has run.
        """
        skips = skip_flags(self.spans, self.cuts, bits, attention_bits)
        if any(skips.values()) and self._cached is None:
            self.float_outputs()
        outs = []
        for k, batch in enumerate(batches(self.images, self.batch_size, self.mesh)):
            cached = self._placeholders(batch) if self._cached is None else self._cached[k]
            outs.append(np.asarray(self.quantizer.apply_skipping(batch, bits, attention_bits, skips, cached)[0]))
        return np.concatenate(outs)

    def _placeholders(self, batch) -> dict[str, Any]:
        return self.spans.placeholders(self.cuts, int(jax.tree.leaves(batch)[0].shape[0]))
