"""Runs the data-parallel stages on one device and on every device, and prints their differences as JSON.

Run by `test_data_parallel.py` in a subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=4 (the
device count is fixed when jax starts). Each figure compares a mesh of all devices (and a user's 2 × 2 mesh)
with a mesh of the first device alone, on the same inputs.
"""

import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh  # noqa: E402

from conftest import tiny_setup_values  # noqa: E402
from lampq_jax import LampQConfig, data_mesh, find_layers, quantize, quantize_uniform  # noqa: E402
from lampq_jax.apply import calibrate_activations  # noqa: E402
from lampq_jax.apply.data_parallel import shard_batch  # noqa: E402
from lampq_jax.report import accuracy  # noqa: E402
from lampq_jax.sensitivity import fisher_traces  # noqa: E402
from lampq_jax.sensitivity.metric import activation_errors  # noqa: E402


def max_relative(a: dict, b: dict) -> float:
    return max(abs(a[k] - b[k]) / max(abs(b[k]), 1e-30) for k in b)


def relative_error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def main() -> dict:
    model, variables, images = tiny_setup_values()
    images = np.asarray(images)  # [16, 28, 28, 1]
    uneven = images[:14]  # 14 = 3 × 4 + 2: the Fisher pass pads, the statistics' batches fall back to replicated
    one = data_mesh(jax.devices()[:1])
    meshes = {"all": data_mesh(), "user_2x2": Mesh(np.asarray(jax.devices()).reshape(2, 2), ("data", "model"))}
    # The Conv patch embedding is left out of the Fisher pass: on jax 0.7.2 (Colab TPU's), vmap of the per-sample
    # gradient of a Conv kernel hits NotImplementedError in its batching rule, on one device as on four; the
    # pipeline never asks for it (embed is a fixed type).
    all_layers = find_layers(model, variables, images[:1])
    layers = [l for l in all_layers if l.kind != "conv"]
    out = {"devices": jax.device_count()}
    sharded, replicated = shard_batch(images, meshes["all"]), shard_batch(uneven, meshes["all"])
    out["sharded_devices"] = len(sharded.sharding.device_set)
    out["sharded_local_rows"] = int(sharded.addressable_shards[0].data.shape[0])
    out["uneven_fully_replicated"] = bool(replicated.sharding.is_fully_replicated)

    def run(mesh, *, stages: bool = False):
        fisher = fisher_traces(model, variables, uneven, layers, rng=jax.random.key(0), batch_size=4, mesh=mesh)
        tables = calibrate_activations(model, variables, images, batch_size=8, mesh=mesh)
        errors = activation_errors(model, variables, images, layers, tables, (2, 4, 8), batch_size=8, mesh=mesh)
        if stages:
            return {"fisher_w": fisher.weight, "fisher_a": fisher.activation, "tables": tables, "errors": errors}
        config = LampQConfig(progress=False, iterations=2)
        lampq = quantize(model, variables, images, budget=4.0, config=config, mesh=mesh)
        uniform = quantize_uniform(model, variables, images, 4, mesh=mesh)
        labels = np.argmax(np.asarray(model.apply(variables, images)), -1)
        return {
            "fisher_w": fisher.weight,
            "fisher_a": fisher.activation,
            "tables": tables,
            "errors": errors,
            "bits": lampq.bits,
            "result_devices": max(
                len(leaf.devices())
                for leaf in jax.tree_util.tree_leaves(lampq.quantized.variables)
                if hasattr(leaf, "devices")
            ),
            "J": [h["J"] for h in lampq.report["history"]],
            "lampq_out": np.asarray(lampq.apply(images)),
            "uniform_out": np.asarray(uniform.apply(images)),
            "accuracy": accuracy(lampq.apply, images, labels, batch_size=8, mesh=mesh),
        }

    ref = run(one)
    for name, mesh in meshes.items():
        got = run(mesh, stages=name != "all")  # the user's mesh: the stages only (the pipeline is the same code)
        out[name] = {
            "fisher_w_rel": max_relative(got["fisher_w"], ref["fisher_w"]),
            "fisher_a_rel": max_relative(got["fisher_a"], ref["fisher_a"]),
            "tables_max_abs": max(float(np.nanmax(np.abs(got["tables"][s] - ref["tables"][s]))) for s in ref["tables"]),
            "tables_sites_equal": sorted(got["tables"]) == sorted(ref["tables"]),
            "errors_rel": float(np.max(np.abs(got["errors"] - ref["errors"]) / np.abs(ref["errors"]))),
        }
        if "bits" in got:
            out[name].update(
                {
                    "bits_equal": got["bits"] == ref["bits"],
                    "J_max_abs": float(np.max(np.abs(np.subtract(got["J"], ref["J"]))))
                    if len(got["J"]) == len(ref["J"])
                    else float("inf"),
                    "J_rel": float(np.max(np.abs(np.subtract(got["J"], ref["J"])) / np.abs(ref["J"])))
                    if len(got["J"]) == len(ref["J"])
                    else float("inf"),
                    "lampq_out_rel": relative_error(got["lampq_out"], ref["lampq_out"]),
                    "uniform_out_rel": relative_error(got["uniform_out"], ref["uniform_out"]),
                    "top1_equal": bool(np.array_equal(got["lampq_out"].argmax(-1), ref["lampq_out"].argmax(-1))),
                    "accuracy_equal": got["accuracy"] == ref["accuracy"],
                    "result_devices": got["result_devices"],
                }
            )
    return out


if __name__ == "__main__":
    print(json.dumps(main()))
