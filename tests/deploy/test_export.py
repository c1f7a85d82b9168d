"""Export to packed low-bit tensors, integer inference on them, and Qwix rules."""

import dataclasses
import importlib.metadata
import json
import math
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict, unflatten_dict

from lampq_jax.apply import calibrate_activations, find_attention_paths
from lampq_jax.apply.fake import QuantSpec, quantize_weight
from lampq_jax.deploy.integer import IntegerModel, integer_apply
from lampq_jax.apply.model import QuantizedModel
from lampq_jax.layers import find_layers
from lampq_jax.deploy.export import (
    container_bits,
    export_nbytes,
    export_result,
    kernel_matrix,
    load_export,
    restore_kernel,
    save_export,
)
from lampq_jax.pipeline import size_report
from lampq_jax.quant import packing, uniform
from lampq_jax.quant.qtensor import QuantizedTensor
from lampq_jax.deploy.qwix_rules import qwix_params, qwix_qtype, qwix_qtype_bits, qwix_rules
from lampq_jax.result import QuantizationResult


@pytest.fixture(scope="module")
def mixed(tiny_setup):
    """Weights at every width 2..8 across the layers (7 included), activations at other widths
    (the Conv embedding at equal widths, as Qwix needs)."""
    model, variables, images = tiny_setup
    layers = find_layers(model, variables, images[:1])
    attention = find_attention_paths(model, variables, images[:1])
    act_params = calibrate_activations(model, variables, images[:8], method="minmax")
    bits = {l.path: (2 + i % 7, 2 + (i + 3) % 7) for i, l in enumerate(sorted(layers, key=lambda l: l.path))}
    bits["embedding"] = (8, 8)
    spec = QuantSpec.build(layers, bits, attention_bits={p: 6 for p in attention})
    quantized = QuantizedModel.create(model, variables, layers, spec, act_params, {})
    return QuantizationResult(quantized=quantized, method="mixed")


@pytest.fixture(scope="module")
def tensors(mixed):
    return mixed.export()


def kernels(result):
    flat = flatten_dict(result.quantized.variables["params"], sep="/")
    return {p: flat[f"{p}/kernel"] for p in result.bits}


def test_export_dequantizes_exactly_to_fake_quantized_kernels(mixed, tensors):
    assert mixed.export().keys() == tensors.keys()  # the method delegates to export_result
    layers = {l.path: l for l in mixed.quantized.layers}
    assert list(tensors) == [p for p, _, _ in mixed.quantized.spec.layers]
    assert sorted({b for b, _ in mixed.bits.values()}) == [2, 3, 4, 5, 6, 7, 8]
    for path, kernel in kernels(mixed).items():
        t, wbits = tensors[path], mixed.bits[path][0]
        assert t.bits == container_bits(wbits) and t.shape == tuple(kernel.shape)
        assert int(t.codes().max()) <= 2**wbits - 1 and int(t.codes().min()) >= 0
        np.testing.assert_array_equal(np.asarray(restore_kernel(t, layers[path].out_axes)), np.asarray(kernel))
    block = "Transformer/encoderblock_0/MultiHeadDotProductAttention_0"
    assert tensors[f"{block}/query"].matrix_shape == (32, 32)  # [D, H, hd] -> [D, H·hd]
    assert tensors[f"{block}/out"].matrix_shape == (32, 32)  # [H, hd, D] -> [H·hd, D]
    assert tensors["embedding"].matrix_shape == (49, 32)  # [7, 7, 1, 32] -> [49, 32]


def test_exported_codes_are_the_quantizers_own(tiny_setup, mixed, tensors):
    """Export reads the codes the kernels were made from: uniform.quantize of the float kernel on its grid."""
    _, variables, _ = tiny_setup
    layers = {l.path: l for l in mixed.quantized.layers}
    float_kernels = flatten_dict(variables["params"], sep="/")
    for path in ("Transformer/encoderblock_0/MultiHeadDotProductAttention_0/out", "embedding"):
        wbits, out_axes = mixed.bits[path][0], tuple(layers[path].out_axes)
        codes, grid = quantize_weight(float_kernels[f"{path}/kernel"], wbits, out_axes)
        np.testing.assert_array_equal(tensors[path].grid(out_axes).scale, grid.scale)
        np.testing.assert_array_equal(tensors[path].grid(out_axes).zero_point, grid.zero_point)
        np.testing.assert_array_equal(
            np.asarray(tensors[path].codes()), np.asarray(kernel_matrix(np.asarray(codes), out_axes)[0])
        )


def test_from_kernel_keeps_an_einsum_layout():
    """Output axis in the middle: the tensor stores [K, N] with the output axis last and gives the kernel back."""
    kernel = jax.random.normal(jax.random.key(1), (4, 3, 5))
    out_axes = (1,)
    grid = uniform.minmax_params(kernel, 5, reduce_axes=(0, 2))
    codes = uniform.quantize(kernel, grid, 5)
    tensor = QuantizedTensor.from_kernel(codes, grid, 5, out_axes)
    assert tensor.shape == (4, 5, 3) and tensor.matrix_shape == (20, 3)
    np.testing.assert_array_equal(tensor.kernel(out_axes), uniform.dequantize(codes, grid))
    np.testing.assert_array_equal(tensor.grid(out_axes).scale, grid.scale)
    np.testing.assert_array_equal(tensor.codes(), kernel_matrix(np.asarray(codes), out_axes)[0])


def test_export_names_layers_without_codes(tiny_setup, mixed):
    _, variables, _ = tiny_setup
    by_hand = dataclasses.replace(mixed.quantized, variables=variables, weights={})  # no codes
    with pytest.raises(ValueError, match=r"layer\(s\) \['Transformer/encoderblock_0/.*'\] have no codes"):
        export_result(QuantizationResult(quantized=by_hand, method="by hand"))
    with pytest.raises(ValueError, match=r"bits must be an integer in \[2, 8\], got 9"):
        container_bits(9)


def test_kernel_matrix_puts_output_axes_last():
    kernel = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    matrix, shape = kernel_matrix(kernel, (1,))  # an einsum kernel with its output axis in the middle
    assert matrix.shape == (8, 3) and shape == (2, 4, 3)
    np.testing.assert_array_equal(matrix[:, 1], kernel[:, 1, :].reshape(-1))


def test_save_and_load_export(tmp_path, mixed, tensors):
    side = save_export(tmp_path / "vit_q.npz", tensors, mixed)
    assert sorted(os.listdir(tmp_path)) == ["vit_q.json", "vit_q.npz"] and side == tmp_path / "vit_q.json"
    loaded, meta = load_export(tmp_path / "vit_q.npz")
    assert list(loaded) == list(tensors)
    for path, t in tensors.items():
        got = loaded[path]
        assert (got.bits, got.shape, got.dtype) == (t.bits, t.shape, t.dtype)
        for field in ("packed", "scale", "zero_point"):
            np.testing.assert_array_equal(getattr(got, field), getattr(t, field))
        entry = meta["layers"][path]
        assert (entry["weight_bits"], entry["act_bits"]) == mixed.bits[path]
        assert entry["container_bits"] == container_bits(entry["weight_bits"])
    assert json.loads(side.read_text())["attention_bits"] == dict(mixed.quantized.spec.attention)
    with pytest.raises(ValueError, match="must end in '.npz'.*'.*vit_q.bin'"):
        save_export(tmp_path / "vit_q.bin", tensors, mixed)
    with pytest.raises(FileNotFoundError, match="other.json is missing"):
        (tmp_path / "other.npz").write_bytes((tmp_path / "vit_q.npz").read_bytes())
        load_export(tmp_path / "other.npz")


def test_export_nbytes_counts_codes_scales_and_float_params(tiny_setup, mixed, tensors):
    _, variables, _ = tiny_setup
    expected = 0
    for key, value in flatten_dict(variables["params"], sep="/").items():
        path = key[: -len("/kernel")]
        if key.endswith("/kernel") and path in tensors:
            k, n = tensors[path].matrix_shape
            expected += packing.packed_length(k, tensors[path].bits) * n + 8 * n
        else:
            expected += 4 * value.size
    assert export_nbytes(tensors, variables) == expected
    # the run's own estimate counts b/8 bytes a weight: export adds only 7-bit containers and padding
    padding = sum(
        packing.packed_length(t.matrix_shape[0], t.bits) * t.matrix_shape[1] - math.prod(t.shape) * mixed.bits[p][0] / 8
        for p, t in tensors.items()
    )
    assert export_nbytes(tensors, variables) == pytest.approx(
        size_report(mixed.quantized.layers, mixed.bits, variables)["model_bytes"] + padding
    )
    with pytest.raises(ValueError, match="'nope' has no kernel"):
        export_nbytes({"nope": tensors["embedding"]}, variables)


def test_integer_inference_matches_fake_quantized_model(tmp_path, tiny_setup, mixed, tensors):
    _, _, images = tiny_setup
    save_export(tmp_path / "m.npz", tensors, mixed)
    tensors, _ = load_export(tmp_path / "m.npz")
    model = IntegerModel(mixed, tensors)
    dense = sorted(l.path for l in mixed.quantized.layers if l.kind in ("dense", "dense_general"))
    assert sorted(model.integer_layers) == dense and len(dense) == 13  # all but the Conv embedding
    params = flatten_dict(model._variables["params"], sep="/")
    assert not any(f"{p}/kernel" in params for p in dense) and "embedding/kernel" in params
    want = np.asarray(mixed.apply(images))
    got = np.asarray(integer_apply(mixed, tensors, images))
    rel = np.abs(got - want).max() / np.abs(want).max()
    assert rel < 1e-4, rel
    with pytest.raises(ValueError, match=r"tensors \['nope'\] are not quantized layers"):
        IntegerModel(mixed, {"nope": tensors["embedding"]})


# ---- Qwix -------------------------------------------------------------------------------------


def test_qwix_qtypes_map_every_width_to_itself():
    for bits in range(2, 9):
        assert qwix_qtype_bits(qwix_qtype(bits)) == bits
    assert qwix_qtype(4) is jnp.int4 and qwix_qtype(3) == "int3"
    with pytest.raises(ValueError, match="got 9"):
        qwix_qtype(9)


@pytest.mark.filterwarnings("ignore:'VariableState' was removed:DeprecationWarning")  # inside qwix 0.1.8
def test_qwix_ptq_quantizes_exactly_the_assignment(tiny_setup, mixed):
    qwix = pytest.importorskip("qwix", reason="qwix is an optional dependency (pip install qwix)")
    model, variables, images = tiny_setup
    rules = qwix_rules(mixed)
    assert [r.module_path for r in rules] == [f"^{re.escape(p)}$" for p, _, _ in mixed.quantized.spec.layers]
    provider = qwix.PtqProvider(rules)
    qmodel = qwix.quantize_model(model, provider)
    abstract = jax.eval_shape(lambda: qmodel.init(jax.random.key(0), images[:1]))["params"]
    qparams = jax.jit(lambda params: qwix.quantize_params(params, abstract))(variables["params"])
    if hasattr(provider, "get_unused_rules"):  # qwix ≥ 0.1.4; 0.1.2 (the last for flax 0.11, Colab's) lacks it,
        assert provider.get_unused_rules() == []  # and the check below that every layer got its bits covers it
    quantized = {}
    for key, leaf in flatten_dict(qparams, sep="/").items():
        if isinstance(leaf, jax.Array):
            continue
        array = leaf.array
        assert key.endswith("/kernel"), key
        bits = qwix_qtype_bits(array.qtype)
        lo, hi = int(array.qvalue.min()), int(array.qvalue.max())
        assert -(2 ** (bits - 1)) <= lo and hi <= 2 ** (bits - 1) - 1, (key, bits, lo, hi)
        quantized[key[: -len("/kernel")]] = bits
    assert quantized == {p: wb for p, (wb, _) in mixed.bits.items()}
    theirs = np.asarray(jax.jit(qmodel.apply)({"params": qparams}, images))
    ours = np.asarray(mixed.apply(images))
    rel = float(np.abs(theirs - ours).max() / np.abs(ours).max())
    print(f"qwix {importlib.metadata.version('qwix')} vs lampq_jax, mixed 2-8 bits: max |Δ| / max |y| = {rel:.3f}")
    assert np.isfinite(theirs).all() and np.isfinite(rel)


@pytest.mark.filterwarnings("ignore:'VariableState' was removed:DeprecationWarning")  # inside qwix 0.1.8
def test_qwix_params_carry_the_results_own_codes(tiny_setup, mixed):
    qwix = pytest.importorskip("qwix", reason="qwix is an optional dependency (pip install qwix)")
    model, variables, images = tiny_setup
    rules = qwix_rules(mixed)
    abstract = lambda rules: jax.eval_shape(
        lambda: qwix.quantize_model(model, qwix.PtqProvider(rules)).init(jax.random.key(0), images[:1])
    )["params"]
    qparams = qwix_params(mixed, abstract(rules))
    q = mixed.quantized
    ours = flatten_dict(q.variables["params"], sep="/")
    leaves = flatten_dict(qparams, sep="/")
    kinds = {l.path: l.kind for l in q.layers}
    for path, weight_bits, _ in q.spec.layers:
        array = leaves[f"{path}/kernel"].array
        assert qwix_qtype_bits(array.qtype) == weight_bits
        if kinds[path] == "conv":  # Qwix's own symmetric rounding of our kernel
            assert array.zero_point is None
            continue
        np.testing.assert_array_equal(np.asarray(qwix.dequantize(array)), np.asarray(ours[f"{path}/kernel"]))
    # with Qwix's own (dynamic) activation quantization too; the activations differ from ours, so only finite
    full = jax.jit(qwix.quantize_model(model, qwix.PtqProvider(rules)).apply)({"params": qparams}, images)
    assert np.isfinite(np.asarray(full)).all()
    # weights only: Qwix's model with these params is the result's model with Qwix's kernels, to float rounding
    convs = {f"^{re.escape(p)}$" for p, kind in kinds.items() if kind == "conv"}  # need act = weight qtype: left float
    weights_only = [dataclasses.replace(r, act_qtype=None) for r in rules if r.module_path not in convs]
    qmodel = qwix.quantize_model(model, qwix.PtqProvider(weights_only))
    own_params = qwix_params(mixed, abstract(weights_only))
    theirs = jax.jit(qmodel.apply)({"params": own_params}, images)
    leaves = flatten_dict(own_params, sep="/")
    kernels = {k: qwix.dequantize(v.array) if hasattr(v, "array") else v for k, v in leaves.items()}
    reference = model.apply({**variables, "params": unflatten_dict(kernels, sep="/")}, images)
    np.testing.assert_allclose(np.asarray(theirs), np.asarray(reference), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="no symmetric Qwix-quantized kernel"):
        qwix_params(mixed, jax.eval_shape(lambda: model.init(jax.random.key(0), images[:1]))["params"])


def test_qwix_rules_refuse_what_qwix_cannot_express(mixed):
    pytest.importorskip("qwix", reason="qwix is an optional dependency (pip install qwix)")
    with pytest.raises(ValueError, match="only at 4 and 8 bits, but layer"):
        qwix_rules(mixed, weight_calibration_method="minmax")
    q = mixed.quantized
    spec = QuantSpec.build(q.layers, {**q.spec.bits, "embedding": (8, 4)})
    conv_mixed = QuantizationResult(quantized=QuantizedModel(q.model, q.layers, spec, None, {}), method="x")
    with pytest.raises(ValueError, match=r"conv layer\(s\) \['embedding'\] have \(weight, act\) bits \[\(8, 4\)\]"):
        qwix_rules(conv_mixed)
