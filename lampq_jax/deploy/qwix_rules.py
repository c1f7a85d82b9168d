"""Qwix rules for a quantization result: one exact-path rule per layer, at its bits.

For users who serve with Qwix (https://github.com/google/qwix): the bit assignment of a result
becomes a list of `qwix.QuantizationRule`, one per quantized layer, whose `module_path` is the
layer's path, escaped and anchored (`^...$`), so it matches that layer and nothing else (Qwix
tries rules in order and takes the first that matches the module path in full).

Bit-widths map one to one: b bits -> `jnp.int4` (b = 4), `jnp.int8` (b = 8), and Qwix's own
integer types 'int2', 'int3', 'int5', 'int6', 'int7' (stored in int4 / int8 containers, values
clipped to [-2^(b-1), 2^(b-1) - 1]). Nothing is rounded up.

With `qwix.quantize_params`, Qwix quantizes the weights itself: per channel, symmetric from the absolute
maximum (`weight_calibration_method='absmax'`, Qwix's default; its asymmetric 'minmax' supports only int4
and int8). `qwix_params(result, abstract)` hands Qwix the result's own codes instead: every Dense /
DenseGeneral / Einsum kernel becomes Qwix's quantized array with the result's codes, scale and zero point,
so Qwix computes with exactly the result's kernels. Qwix's convolution takes no weight zero point, so Conv
kernels (the patch embedding) are still rounded by Qwix, from the result's kernel. Activations are Qwix's
own either way: quantized dynamically per token unless the rule asks for static ranges, where LampQ uses
calibrated static ranges, so the two models agree on the weights and on how many bits each input gets,
not on the activation values. The attention matmuls (q, k, v and LampQ's softmax quantizer) get no rule:
Qwix's PTQ provider quantizes an einsum's inputs only under a rule that also quantizes a weight. Qwix's PTQ
convolution needs the same type for weights and activations, so a Conv layer with different weight and
activation bits raises.

Qwix is an optional dependency (tested with qwix 0.1.8, jax 0.10.2, flax 0.12.8):
`pip install qwix`.

Example:
    >>> rules = qwix_rules(result)
    >>> qmodel = qwix.quantize_model(model, qwix.PtqProvider(rules))
    >>> abstract = jax.eval_shape(qmodel.init, jax.random.key(0), images[:1])["params"]
    >>> qparams = qwix_params(result, abstract)  # or Qwix's own: qwix.quantize_params(variables["params"], abstract)
    >>> logits = qmodel.apply({"params": qparams}, images)
"""

from __future__ import annotations

import re
from typing import Any, Optional

import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from lampq_jax.quant.uniform import check_bits

QWIX_NATIVE_BITS = {4: "int4", 8: "int8"}  # bits with a jnp dtype; the others are Qwix strings


def _import_qwix():
    try:
        import qwix  # noqa: PLC0415 (optional dependency)
    except ImportError as error:
        raise ImportError(
            "qwix_rules needs Qwix, an optional dependency: pip install qwix "
            "(tested with qwix 0.1.8 on jax 0.10.2 / flax 0.12.8)"
        ) from error
    return qwix


def qwix_qtype(bits: int) -> Any:
    """Qwix's quantized type for `bits`-bit integers: jnp.int4, jnp.int8, or 'int2' / 'int3' / 'int5' / 'int6' / 'int7'.

    Raises:
      ValueError: `bits` is not an integer in [2, 8].
    """
    bits = check_bits(bits)
    if bits in QWIX_NATIVE_BITS:
        return getattr(jnp, QWIX_NATIVE_BITS[bits])
    return f"int{bits}"


def qwix_qtype_bits(qtype: Any) -> int:
    """Bits of a Qwix integer qtype (inverse of `qwix_qtype`): 'int3' -> 3, jnp.int8 -> 8.

    Raises:
      ValueError: a qtype that is not a signed integer type of 2 to 8 bits.
    """
    name = qtype if isinstance(qtype, str) else getattr(qtype, "__name__", None) or str(qtype)
    match = re.fullmatch(r"int([2-8])", str(name))
    if match is None:
        try:
            match = re.fullmatch(r"int([2-8])", np.dtype(qtype).name)
        except TypeError:
            match = None
    if match is None:
        raise ValueError(f"{qtype!r} is not a Qwix integer qtype of 2 to 8 bits")
    return int(match.group(1))


def qwix_rules(
    result: Any,
    *,
    weight_calibration_method: str = "absmax",
    act_calibration_method: Optional[str] = None,
    act_static_scale: Optional[bool] = None,
) -> list:
    """One `qwix.QuantizationRule` per quantized layer of `result`, at its weight and activation bits.

    Args:
      result: a `QuantizationResult`; its `bits` {path: (weight bits, act bits)} are exported.
      weight_calibration_method: Qwix's weight calibration ('absmax' works at every width;
        'minmax' only at 4 and 8 bits).
      act_calibration_method, act_static_scale: passed to every rule (None: Qwix's defaults).

    Returns:
      Rules in the order of `result.quantized.spec.layers`, each with
      `module_path = '^' + re.escape(path) + '$'`, `weight_qtype = qwix_qtype(weight bits)` and
      `act_qtype = qwix_qtype(activation bits)`.

    Raises:
      ImportError: Qwix is not installed.
      ValueError: widths Qwix cannot express, with the layers named: 'minmax' calibration at
        a width other than 4 or 8, or a Conv layer whose weight and activation bits differ
        (Qwix's PTQ convolution needs `act_qtype == weight_qtype`).
    """
    qwix = _import_qwix()
    bits = result.quantized.spec.bits
    for which, name, method in (
        (0, "weight_calibration_method", weight_calibration_method),
        (1, "act_calibration_method", act_calibration_method),
    ):
        if method is not None and method.split(",")[0] == "minmax":
            bad = sorted(p for p, b in bits.items() if b[which] not in QWIX_NATIVE_BITS)
            if bad:
                raise ValueError(
                    f"{name}={method!r}: Qwix quantizes asymmetrically only at 4 and 8 bits, "
                    f"but layer(s) {bad[:5]} use {[bits[p][which] for p in bad[:5]]} bits"
                )
    kinds = {l.path: l.kind for l in result.quantized.layers}
    mixed_conv = sorted(p for p, (wb, ab) in bits.items() if kinds.get(p) == "conv" and wb != ab)
    if mixed_conv:
        raise ValueError(
            f"Qwix's PTQ convolution needs equal weight and activation types, but conv layer(s) "
            f"{mixed_conv[:5]} have (weight, act) bits {[bits[p] for p in mixed_conv[:5]]}"
        )
    extra = {}
    if act_calibration_method is not None:
        extra["act_calibration_method"] = act_calibration_method
    if act_static_scale is not None:
        extra["act_static_scale"] = act_static_scale
    return [
        qwix.QuantizationRule(
            module_path=f"^{re.escape(path)}$",
            weight_qtype=qwix_qtype(wbits),
            act_qtype=qwix_qtype(abits),
            weight_calibration_method=weight_calibration_method,
            **extra,
        )
        for path, wbits, abits in result.quantized.spec.layers
    ]


def qwix_params(result: Any, abstract: Any) -> dict:
    """Qwix PTQ params that carry `result`'s own weight codes instead of Qwix's re-quantization.

    For each quantized Dense / DenseGeneral / Einsum layer, the kernel leaf is Qwix's quantized array built
    from the result's `QuantizedTensor` (codes q ∈ [0, 2^b − 1], scale s, zero point z per output channel):

        qvalue = q − 2^(b−1),   zero_point = z − 2^(b−1)   (in the rule's storage type),   scale = s

    so Qwix computes with (qvalue − zero_point) · s = (q − z) · s, the result's own kernel, bit for bit.
    Every other param goes through `qwix.quantize_params` from the result's variables; that includes the
    Conv kernels (the patch embedding): Qwix's convolution takes no weight zero point, so Qwix rounds those
    kernels, already on the result's grid, on its own symmetric grid.

    Args:
      result: a `QuantizationResult`.
      abstract: the Qwix model's abstract params, built with `qwix_rules(result)` (symmetric weights, the
        default): `jax.eval_shape(qmodel.init, key, x)['params']`.

    Returns:
      The param tree for `qmodel.apply({'params': ...}, x)`.

    Raises:
      ImportError: Qwix is not installed.
      ValueError: a quantized layer whose leaf in `abstract` is not Qwix-quantized at its bits in its own
        kernel layout (not built with `qwix_rules(result)`), named.
    """
    qwix = _import_qwix()
    quantized = result.quantized
    params = flatten_dict(dict(quantized.variables)["params"])
    templates = flatten_dict(abstract)
    by_path = {layer.path: layer for layer in quantized.layers}
    own = {}
    for path, weight_bits, _ in quantized.spec.layers:
        layer = by_path[path]
        if layer.kind != "conv":
            key = (*path.split("/"), "kernel")
            own[key] = _own_leaf(templates.get(key), quantized.weights[path], weight_bits, layer.out_axes, path)
    rest = unflatten_dict({k: v for k, v in params.items() if k not in own})
    return unflatten_dict({**flatten_dict(qwix.quantize_params(rest, abstract)), **own})


def _own_leaf(template: Any, tensor: Any, bits: int, out_axes: tuple[int, ...], path: str) -> Any:
    """`template` (Qwix's abstract leaf) holding `tensor`'s codes and grid (see `qwix_params`)."""
    qarray = getattr(template, "array", None)
    if qarray is None or qarray.zero_point is not None:
        raise ValueError(
            f"layer {path!r} has no symmetric Qwix-quantized kernel in `abstract` (found {type(template).__name__}); "
            "build the Qwix model with qwix_rules(result)"
        )
    codes, grid = tensor.kernel_codes(out_axes), tensor.grid(out_axes)
    if (
        qwix_qtype_bits(qarray.qtype) != bits
        or codes.shape != qarray.qvalue.shape
        or grid.scale.shape != qarray.scale.shape
    ):
        raise ValueError(
            f"layer {path!r}: Qwix's kernel is {qarray.qtype} {tuple(qarray.qvalue.shape)} with scale "
            f"{tuple(qarray.scale.shape)}, the result's is int{bits} {tuple(codes.shape)} with scale {tuple(grid.scale.shape)}"
        )
    offset, dtype = 2 ** (bits - 1), qarray.qvalue.dtype
    return template.replace(
        array=qarray.replace(
            qvalue=(codes - offset).astype(dtype),
            scale=grid.scale.astype(qarray.scale.dtype),
            zero_point=(grid.zero_point.astype(codes.dtype) - offset).astype(dtype),
        )
    )


__all__ = ["QWIX_NATIVE_BITS", "qwix_params", "qwix_qtype", "qwix_qtype_bits", "qwix_rules"]
