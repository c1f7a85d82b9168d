"""Pallas kernels in interpret mode equal their pure-jnp references; the wrappers check inputs."""

import importlib.util
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lampq_jax.kernels import BlockSizes
from lampq_jax.kernels import int8_default_block_sizes
from lampq_jax.kernels import int8_matmul
from lampq_jax.kernels import int8_matmul_reference
from lampq_jax.kernels import quantize_int8_symmetric
from lampq_jax.kernels import weight_only_default_block_sizes
from lampq_jax.kernels import weight_only_matmul
from lampq_jax.kernels import weight_only_matmul_reference
from lampq_jax.kernels.tiling import fit_block
from lampq_jax.quant.packing import SUPPORTED_BITS
from lampq_jax.quant.qtensor import QuantizedTensor

# Relative to max |reference|. The kernel multiplies exact integer codes and factors the zero
# point out, so in float32 it differs from the reference only by float32 rounding; a bfloat16
# output adds one bfloat16 rounding (2**-8 relative).
_TOL = {jnp.float32: 2e-6, jnp.bfloat16: 1e-2}


def _inputs(m, k, n, bits, dtype, seed=0):
    kx, kw = jax.random.split(jax.random.PRNGKey(seed))
    x = jax.random.normal(kx, (m, k), jnp.float32).astype(dtype)
    w = jax.random.normal(kw, (k, n), jnp.float32) * 0.05
    return x, QuantizedTensor.from_float(w, bits)


def _assert_close(out, ref, tol):
    out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    assert out.shape == ref.shape
    scale = np.abs(ref).max()
    np.testing.assert_allclose(out, ref, rtol=0, atol=tol * scale)


# ---- weight-only ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_weight_only_matches_reference_odd_shape(bits, dtype):
    x, qw = _inputs(3, 100, 70, bits, dtype)
    out = weight_only_matmul(x, qw, out_dtype=jnp.float32, interpret=True)
    _assert_close(out, weight_only_matmul_reference(x, qw, out_dtype=jnp.float32), 2e-6)
    if dtype == jnp.bfloat16 and bits == 4:  # default output dtype is x.dtype
        out = weight_only_matmul(x, qw, interpret=True)
        assert out.dtype == jnp.bfloat16
        _assert_close(out, weight_only_matmul_reference(x, qw), _TOL[jnp.bfloat16])


@pytest.mark.parametrize("bits", [3, 4])
def test_weight_only_single_row(bits):
    x, qw = _inputs(1, 100, 70, bits, jnp.bfloat16, seed=1)
    out = weight_only_matmul(x, qw, interpret=True)
    assert out.shape == (1, 70)
    _assert_close(out, weight_only_matmul_reference(x, qw), _TOL[jnp.bfloat16])


def test_weight_only_many_blocks_and_padding():
    # grid 2 x 2, three K chunks, K and N padded (the packed weight is re-laid per field).
    x, qw = _inputs(20, 300, 150, 5, jnp.float32, seed=2)
    blocks = BlockSizes(block_m=16, block_n=128, block_k=128)
    out = weight_only_matmul(x, qw, block_sizes=blocks, interpret=True)
    _assert_close(out, weight_only_matmul_reference(x, qw), _TOL[jnp.float32])


def test_weight_only_under_jit_does_not_retrace():
    traces = []

    @jax.jit
    def f(x, qw):
        traces.append(1)
        return weight_only_matmul(x, qw, interpret=True)

    x, qw = _inputs(3, 100, 70, 4, jnp.float32)
    _, qw2 = _inputs(3, 100, 70, 4, jnp.float32, seed=5)
    _assert_close(f(x, qw), weight_only_matmul_reference(x, qw), _TOL[jnp.float32])
    f(x + 1, qw2)
    assert len(traces) == 1


def test_weight_only_rejects_bad_inputs():
    x, qw = _inputs(3, 100, 70, 4, jnp.float32)
    with pytest.raises(ValueError, match=r"x.shape\[1\] = 99.*K = 100"):
        weight_only_matmul(x[:, :99], qw)
    with pytest.raises(ValueError, match="int32"):
        weight_only_matmul(x.astype(jnp.int32), qw)
    with pytest.raises(ValueError, match=r"\(3, 100, 1\)"):
        weight_only_matmul(x[..., None], qw)
    with pytest.raises(ValueError, match="int8"):
        weight_only_matmul(x, qw, out_dtype=jnp.int8)
    broken = QuantizedTensor(
        packed=qw.packed[:-1], scale=qw.scale, zero_point=qw.zero_point, bits=4, shape=qw.shape, dtype=qw.dtype
    )
    with pytest.raises(ValueError, match=r"\(49, 70\).*\(50, 70\)"):
        weight_only_matmul(x, broken)
    with pytest.raises(ValueError, match="bits.*7"):
        QuantizedTensor(
            packed=qw.packed, scale=qw.scale, zero_point=qw.zero_point, bits=7, shape=qw.shape, dtype=qw.dtype
        )
    with pytest.raises(TypeError, match="QuantizedTensor"):
        weight_only_matmul(x, qw.dequantize())
    with pytest.raises(ValueError, match="block_m.*24"):
        BlockSizes(block_m=24, block_n=128, block_k=128)
    with pytest.raises(ValueError, match="block_k.*4"):
        BlockSizes(block_m=16, block_n=128, block_k=4)


# ---- W8A8 ----------------------------------------------------------------------------------


@pytest.mark.parametrize("m,k,n", [(3, 100, 70), (1, 100, 70), (40, 300, 150)])
def test_int8_matches_reference(m, k, n):
    kx, kw = jax.random.split(jax.random.PRNGKey(m))
    x = jax.random.normal(kx, (m, k))
    w = jax.random.normal(kw, (k, n))
    xc, xs = quantize_int8_symmetric(x, axis=1)
    wc, ws = quantize_int8_symmetric(w, axis=0)
    blocks = BlockSizes(block_m=32, block_n=128, block_k=128) if m == 40 else None
    out = int8_matmul(xc, xs, wc, ws, block_sizes=blocks, interpret=True)
    ref = int8_matmul_reference(xc, xs, wc, ws)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=0)  # int32 sums are exact
    # and the W8A8 product is close to the float one
    _assert_close(ref, np.asarray(x) @ np.asarray(w), 0.03)


def test_quantize_int8_symmetric():
    a = jnp.array([[1.0, -2.0, 0.5], [0.0, 0.0, 0.0]])
    codes, scale = quantize_int8_symmetric(a, axis=1)
    assert codes.dtype == jnp.int8 and scale.shape == (2, 1)
    np.testing.assert_array_equal(codes, [[64, -127, 32], [0, 0, 0]])
    np.testing.assert_allclose(scale, [[2 / 127], [1.0]])


def test_int8_rejects_bad_inputs():
    xc = jnp.zeros((3, 100), jnp.int8)
    wc = jnp.zeros((100, 70), jnp.int8)
    xs, ws = jnp.ones((3, 1)), jnp.ones((1, 70))
    with pytest.raises(ValueError, match="100 != 99"):
        int8_matmul(xc, xs, wc[:99], ws)
    with pytest.raises(ValueError, match="x_codes.*float32"):
        int8_matmul(xc.astype(jnp.float32), xs, wc, ws)
    with pytest.raises(ValueError, match=r"x_scale.*\(3, 1\).*\(1, 3\)"):
        int8_matmul(xc, xs.T, wc, ws)
    with pytest.raises(ValueError, match=r"w_scale.*\(1, 70\).*\(70,\)"):
        int8_matmul(xc, xs, wc, ws[0])


# ---- tiling, defaults, lowering ------------------------------------------------------------


def test_fit_block_and_defaults():
    assert fit_block(768, 512, 128) == (256, 768)
    assert fit_block(70, 128, 128) == (128, 128)
    assert fit_block(4096, 512, 128) == (512, 4096)
    assert fit_block(3, 16, 16) == (16, 16)
    for backend in ("tpu", "gpu", "cpu"):
        assert isinstance(weight_only_default_block_sizes(backend), BlockSizes)
        assert isinstance(int8_default_block_sizes(backend), BlockSizes)
    with pytest.raises(ValueError, match="metal"):
        weight_only_default_block_sizes("metal")


@pytest.mark.parametrize("platform,backend", [("tpu", "tpu"), ("cuda", "gpu")])
def test_kernels_lower_for_tpu_and_gpu(platform, backend):
    """From this CPU host the kernels lower to Mosaic (TPU) and Triton (GPU) IR.

    This checks the kernel bodies against each backend's Pallas lowering rules; compiling and
    running them needs the hardware (see benchmarks/bench_kernels_gpu.py).
    """
    x = jax.ShapeDtypeStruct((8, 512), jnp.bfloat16)
    qw = jax.eval_shape(lambda w: QuantizedTensor.from_float(w, 3), jax.ShapeDtypeStruct((512, 512), jnp.float32))
    f = jax.jit(lambda x, qw: weight_only_matmul(x, qw, interpret=False, backend=backend))
    text = f.trace(x, qw).lower(lowering_platforms=(platform,)).as_text()
    assert ("tpu_custom_call" in text) if platform == "tpu" else ("triton" in text)
    codes = jax.ShapeDtypeStruct((8, 512), jnp.int8)
    wcodes = jax.ShapeDtypeStruct((512, 512), jnp.int8)
    g = jax.jit(lambda a, b, c, d: int8_matmul(a, b, c, d, interpret=False, backend=backend))
    g.trace(
        codes, jax.ShapeDtypeStruct((8, 1), jnp.float32), wcodes, jax.ShapeDtypeStruct((1, 512), jnp.float32)
    ).lower(lowering_platforms=(platform,))


# ---- the GPU benchmark script --------------------------------------------------------------


def _load_benchmark():
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_kernels_gpu.py"
    spec = importlib.util.spec_from_file_location("bench_kernels_gpu", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_dry_run_checks_and_writes_nothing(tmp_path, capsys):
    bench = _load_benchmark()
    out = tmp_path / "kernels_gpu.json"
    rows = bench.main(["--dry-run", "--out", str(out)])
    assert {r["kernel"] for r in rows} == {"xla_bf16", "w4_pallas", "w8_pallas", "w8a8_pallas"}
    assert all(r["max_rel_err"] < 2e-2 and r["median_us"] > 0 for r in rows)
    assert not out.exists()
    assert "| w4_pallas |" in capsys.readouterr().out


def test_benchmark_without_gpu_exits_with_a_message():
    bench = _load_benchmark()
    if bench._gpu_device() is not None:
        pytest.skip("a GPU is present")
    with pytest.raises(SystemExit, match="needs a GPU"):
        bench.main([])
