"""Data parallelism: one device's results equal four fake CPU devices' (a subprocess with XLA_FLAGS), and
the mesh helpers check their input."""

import json
import os
import pathlib
import subprocess
import sys

import chex
import jax
import numpy as np
import pytest
from jax.sharding import Mesh

from lampq_jax import data_mesh
from lampq_jax.apply.data_parallel import is_parallel, pad_to_multiple, replicate, resolve_mesh, shard_batch

RUN = pathlib.Path(__file__).with_name("multi_device_run.py")


@pytest.fixture(scope="module")
def four_devices() -> dict:
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, str(RUN)], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_four_devices_split_the_batch(four_devices):
    assert four_devices["devices"] == 4
    assert four_devices["sharded_devices"] == 4 and four_devices["sharded_local_rows"] == 16 // 4
    assert four_devices["uneven_fully_replicated"]  # 14 images: replicated, no image duplicated or dropped


@pytest.mark.parametrize("mesh", ["all", "user_2x2"])
def test_four_devices_give_single_device_traces_and_tables(four_devices, mesh):
    got = four_devices[mesh]
    assert got["fisher_w_rel"] <= 1e-6 and got["fisher_a_rel"] <= 1e-6  # 14 samples: padded to 16, padding dropped
    assert got["tables_sites_equal"] and got["tables_max_abs"] <= 1e-6
    assert got["errors_rel"] <= 1e-4  # sums of squared errors, reassociated over devices


def test_four_devices_give_single_device_bits_and_outputs(four_devices):
    """Same bits. Outputs agree up to codes that flip: a forward over a device's slice of a batch reassociates
    some float sums (~1e-7 relative), and a value that sits on a rounding boundary of a quantizer can land on
    the other side (measured on this model: J within 1 %, outputs within 1 % in norm, same top-1)."""
    got = four_devices["all"]
    assert got["bits_equal"]
    assert got["J_rel"] <= 0.02
    assert got["lampq_out_rel"] <= 0.02 and got["uniform_out_rel"] <= 0.02
    assert got["top1_equal"] and got["accuracy_equal"]
    assert got["result_devices"] == 1  # the stages replicate their inputs; the result stays where it was


def test_one_device_mesh_shards_nothing():
    mesh = data_mesh(jax.devices()[:1])
    x = np.arange(12.0).reshape(3, 4)
    assert not is_parallel(mesh) and not is_parallel(None)
    assert shard_batch(x, mesh) is x and replicate({"a": x}, mesh)["a"] is x
    assert resolve_mesh(mesh) is mesh
    assert resolve_mesh(None).size == jax.device_count()


def test_mesh_input_errors_name_the_value():
    with pytest.raises(TypeError, match="jax.sharding.Mesh.*list"):
        resolve_mesh(jax.devices())
    with pytest.raises(ValueError, match="at least one device"):
        data_mesh([])


def test_pad_to_multiple_repeats_the_last_row():
    x = np.arange(10.0).reshape(5, 2)
    padded = pad_to_multiple(x, 4)
    chex.assert_shape(padded, (8, 2))
    np.testing.assert_array_equal(padded[5:], np.repeat(x[-1:], 3, axis=0))
    assert pad_to_multiple(x, 5) is x


def test_user_mesh_is_kept():
    mesh = Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1), ("data", "model"))
    assert resolve_mesh(mesh) is mesh
