"""Bit packing and QuantizedTensor: exact round trips, pinned layouts, fake-quant math, files."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lampq_jax.quant import packing
from lampq_jax.quant.packing import SUPPORTED_BITS, pack_codes, packed_length, unpack_codes
from lampq_jax.quant.qtensor import QuantizedTensor, load_qtensors, save_qtensors

# ---- packing -------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
@pytest.mark.parametrize("n", [5, 101])
def test_round_trip_is_exact(bits, n):
    rng = np.random.default_rng(bits * 1000 + n)
    codes = rng.integers(0, 2**bits, size=(n, 7))
    codes[0, :2] = [0, 2**bits - 1]  # both extremes
    packed = pack_codes(codes, bits)
    assert packed.dtype == jnp.uint8
    assert packed.shape == (packed_length(n, bits), 7)
    np.testing.assert_array_equal(unpack_codes(packed, bits, n), codes)
    np.testing.assert_array_equal(unpack_codes(packed, bits, n, dtype=jnp.uint8), codes)


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_round_trip_along_other_axes(bits):
    codes = np.random.default_rng(bits).integers(0, 2**bits, size=(2, 5, 37))
    for axis in (1, -1):
        packed = pack_codes(codes, bits, axis=axis)
        assert packed.shape[axis] == packed_length(codes.shape[axis], bits)
        np.testing.assert_array_equal(unpack_codes(packed, bits, codes.shape[axis], axis=axis), codes)


def test_packed_length_is_dense():
    # K = 100: padded to the packing group (8 codes for 3 and 5 bits, 4 for 2 and 6, 2 for 4).
    assert {b: packed_length(100, b) for b in SUPPORTED_BITS} == {2: 25, 3: 39, 4: 50, 5: 65, 6: 75, 8: 100}
    for b in SUPPORTED_BITS:  # a multiple of 8 codes takes exactly bits/8 bytes a code
        assert packed_length(768, b) == 768 * b // 8


def test_pinned_layouts():
    # 4 bits: code 2r in the low nibble, code 2r+1 in the high nibble.
    np.testing.assert_array_equal(pack_codes(np.array([1, 2, 3, 15]), 4), [0x21, 0xF3])
    # 2 bits: four a byte, lowest index in bits 0-1.
    np.testing.assert_array_equal(pack_codes(np.array([1, 2, 3, 0]), 2), [0b00111001])
    # 3 bits = 2-bit field (4 a byte) then 1-bit field (8 a byte): codes 0..7.
    np.testing.assert_array_equal(pack_codes(np.arange(8), 3), [0b11100100, 0b11100100, 0b11110000])
    # 8 bits: one a byte.
    np.testing.assert_array_equal(pack_codes(np.array([0, 200, 255]), 8), [0, 200, 255])


def test_pack_under_jit():
    codes = jnp.arange(64, dtype=jnp.int32).reshape(16, 4) % 32
    f = jax.jit(lambda c: unpack_codes(pack_codes(c, 5), 5, 16))
    np.testing.assert_array_equal(f(codes), codes)


def test_packing_rejects_bad_inputs():
    with pytest.raises(ValueError, match="7"):
        pack_codes(np.zeros(4, np.int32), 7)
    with pytest.raises(ValueError, match=r"\[0, 16\]"):
        pack_codes(np.array([0, 16]), 4)
    with pytest.raises(ValueError, match="-1"):
        pack_codes(np.array([-1, 3]), 4)
    with pytest.raises(ValueError, match="float32"):
        pack_codes(np.zeros(4, np.float32), 4)
    with pytest.raises(ValueError, match="51.*length=100.*50"):
        unpack_codes(jnp.zeros((51, 2), jnp.uint8), 4, 100)
    with pytest.raises(ValueError, match="int32"):
        unpack_codes(jnp.zeros((50,), jnp.int32), 4, 100)


# ---- QuantizedTensor -----------------------------------------------------------------------


def _fake_quant_numpy(w, bits):
    """Per-output-channel asymmetric min-max fake quantization, written independently."""
    w = np.asarray(w, np.float32)
    qmax = np.float32(2**bits - 1)
    lo, hi = w.min(axis=0), w.max(axis=0)
    scale = np.where(hi > lo, (hi - lo) / qmax, np.where(lo != 0, np.abs(lo), 1)).astype(np.float32)
    zero = np.round(-lo / scale)
    q = np.clip(np.round(w / scale) + zero, 0, qmax)
    return ((q - zero) * scale).astype(np.float32)


def _weight(k=99, n=40, seed=0):
    w = np.array(jax.random.normal(jax.random.PRNGKey(seed), (k, n)))
    w[:, 3] = 0.25  # a constant channel
    w[:, 4] = 0.0  # an all-zero channel
    return w


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_dequantize_equals_fake_quant(bits):
    w = _weight()
    qt = QuantizedTensor.from_float(w, bits)
    assert qt.packed.shape == (packed_length(99, bits), 40)
    assert qt.scale.shape == qt.zero_point.shape == (1, 40)
    np.testing.assert_allclose(qt.dequantize(), _fake_quant_numpy(w, bits), rtol=0, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(qt.dequantize())[:, 3:5], w[:, 3:5])  # exact when constant


def test_error_falls_as_bits_rise():
    w = _weight()
    errors = [np.mean((np.asarray(QuantizedTensor.from_float(w, b).dequantize()) - w) ** 2) for b in SUPPORTED_BITS]
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 1e-4


def test_nbytes_of_a_4bit_vit_mlp_weight():
    w = jax.ShapeDtypeStruct((768, 3072), jnp.float32)
    qt = jax.eval_shape(lambda w: QuantizedTensor.from_float(w, 4), w)  # shapes only
    assert qt.packed.shape == (384, 3072)
    assert qt.nbytes == 384 * 3072 + 2 * 4 * 3072
    ratio = qt.nbytes / (768 * 3072 * 4)
    assert ratio == pytest.approx(4 / 32 + 8 / (768 * 4), rel=1e-12)
    assert ratio < 0.128


def test_bf16_weight_and_original_shape_are_static():
    w = jax.random.normal(jax.random.PRNGKey(2), (64, 96)).astype(jnp.bfloat16)
    qt = QuantizedTensor.from_float(w, 6, shape=(64, 2, 48))  # a DenseGeneral kernel
    assert qt.matrix_shape == (64, 96)
    assert qt.dequantize().dtype == jnp.bfloat16
    assert qt.dequantize(jnp.float32).reshape(qt.shape).shape == (64, 2, 48)
    leaves, treedef = jax.tree_util.tree_flatten(qt)
    assert len(leaves) == 3  # packed, scale, zero_point; bits/shape/dtype are static
    traces = []

    @jax.jit
    def f(q):
        traces.append(q.bits)
        return q.dequantize(jnp.float32).sum()

    f(qt)
    f(QuantizedTensor.from_float(w + 1, 6, shape=(64, 2, 48)))
    assert traces == [6]  # same static metadata: no retrace
    f(QuantizedTensor.from_float(w, 3, shape=(64, 2, 48)))
    assert traces == [6, 3]


def test_from_codes_checks_shapes():
    codes = np.zeros((8, 4), np.int32)
    with pytest.raises(ValueError, match="N=4.*\\(3,\\)"):
        QuantizedTensor.from_codes(codes, np.ones(3), np.zeros(4), 4)
    with pytest.raises(ValueError, match=r"\(5, 7\).*\[8, 4\]"):
        QuantizedTensor.from_codes(codes, np.ones(4), np.zeros(4), 4, shape=(5, 7))
    with pytest.raises(ValueError, match="bits.*7"):
        QuantizedTensor.from_float(np.ones((8, 4), np.float32), 7)


def test_save_load_is_exact_and_atomic(tmp_path):
    w = _weight(k=100, n=24)
    tensors = {
        "Transformer/encoderblock_0/MlpBlock_0/Dense_0": QuantizedTensor.from_float(w, 3),
        "head": QuantizedTensor.from_float(w.astype(jnp.bfloat16), 8, shape=(100, 2, 12)),
    }
    path = tmp_path / "model_q.npz"
    save_qtensors(path, {"stale": tensors["head"]})
    save_qtensors(path, tensors)  # overwrites in place
    assert sorted(os.listdir(tmp_path)) == ["model_q.npz"]  # no temporary files left
    loaded = load_qtensors(path)
    assert list(loaded) == list(tensors)
    for name, qt in tensors.items():
        got = loaded[name]
        assert (got.bits, got.shape, got.dtype) == (qt.bits, qt.shape, qt.dtype)
        for field in ("packed", "scale", "zero_point"):
            a, b = np.asarray(getattr(got, field)), np.asarray(getattr(qt, field))
            assert a.dtype == b.dtype
            np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(got.dequantize(), qt.dequantize())


def test_load_rejects_foreign_npz(tmp_path):
    path = tmp_path / "other.npz"
    np.savez(path, a=np.zeros(3))
    with pytest.raises(ValueError, match="__meta__"):
        load_qtensors(path)


def test_fields_cover_every_width():
    for bits in SUPPORTED_BITS:
        fields = packing.packed_fields(bits)
        assert sum(f.bits for f in fields) == bits
        assert all(f.bits in (1, 2, 4, 8) and f.per_byte * f.bits == 8 for f in fields)
