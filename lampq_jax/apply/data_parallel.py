"""Data parallelism over devices: the calibration batch split along its first axis, the model replicated.

Every stage that runs the model over calibration images (activation statistics, Fisher traces,
quantization errors, single-layer probes and J, evaluation) takes `mesh`:

    None            a one-axis mesh over `jax.devices()` (`data_mesh()`)
    a `Mesh`        the user's mesh; the batch is split over all of its axes, the variables replicated
    `data_mesh(ds)` a mesh over the devices `ds`

Jitted stages then run under GSPMD with the batch placed by `shard_batch` (a `NamedSharding` with
`PartitionSpec(axes)`), so a statistic over the batch (min, max, a sum) is the global one and the
result equals the single-device result (sums up to float reassociation). A batch whose size is not a
multiple of the device count is replicated instead, so that no sample is duplicated or dropped. A mesh
of one device shards nothing: the code path is the single-device one.
Per-sample work (the Fisher pass) goes through `shard_map_compat`: each device maps its own samples.
Sums that decide later rounding are made split-independent: Fisher means, key means and quantization
errors are reduced per sample on the host in float64, in sample order; GPTQ's input Hessians are
gathered on one device (`apply.hessians`). What remains is the forward pass itself, which XLA may
compute with a different float association on a smaller per-device batch (~1e-7): a value on a
quantizer's rounding boundary then lands on the other side (measured: the embedded ViT gives the same
bits, J and outputs on 4 fake devices; the 2-block test ViT the same bits, outputs within 1 %).
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def data_mesh(devices: Optional[Sequence[Any]] = None) -> Mesh:
    """A one-axis mesh ('data',) over `devices` (default: all of `jax.devices()`)."""
    devices = list(jax.devices() if devices is None else devices)
    if not devices:
        raise ValueError("data_mesh needs at least one device, got an empty list")
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def resolve_mesh(mesh: Optional[Mesh]) -> Mesh:
    """The mesh a stage shards over: `mesh`, or `data_mesh()` for None.

    Raises:
      TypeError: `mesh` is not a `jax.sharding.Mesh`.
    """
    if mesh is None:
        mesh = data_mesh()
    if not isinstance(mesh, Mesh):
        raise TypeError(f"mesh must be a jax.sharding.Mesh (e.g. lampq_jax.data_mesh()), got {type(mesh).__name__}")
    return mesh


def is_parallel(mesh: Optional[Mesh]) -> bool:
    """Whether `mesh` spans more than one device (None: no)."""
    return mesh is not None and mesh.size > 1


def batch_spec(mesh: Mesh) -> PartitionSpec:
    """PartitionSpec splitting the first axis over every axis of `mesh`."""
    return PartitionSpec(tuple(mesh.axis_names))


def shard_batch(batch: Any, mesh: Optional[Mesh]) -> Any:
    """`batch` [B, ...] split over `mesh` along B; replicated when B % devices ≠ 0; as is on one device."""
    if not is_parallel(mesh):
        return batch
    spec = batch_spec(mesh) if np.shape(batch)[0] % mesh.size == 0 else PartitionSpec()
    return jax.device_put(batch, NamedSharding(mesh, spec))


def replicate(tree: Any, mesh: Optional[Mesh]) -> Any:
    """Every array leaf of `tree` replicated on each device of `mesh`; `tree` as is on one device."""
    if not is_parallel(mesh):
        return tree
    return jax.device_put(tree, NamedSharding(mesh, PartitionSpec()))


def pad_to_multiple(x: np.ndarray, multiple: int) -> np.ndarray:
    """x [N, ...] with copies of its last row appended up to a multiple of `multiple` rows."""
    extra = -x.shape[0] % multiple
    return np.concatenate([x, np.repeat(x[-1:], extra, axis=0)]) if extra else x


def shard_map_compat(fn: Callable, mesh: Mesh, in_specs: Any, out_specs: Any) -> Callable:
    """`jax.shard_map` without the replication check (jax ≥ 0.7.2, the lowest version we support): each
    device's body is local code, and gradients taken inside it stay local."""
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
