"""Scenic's own ViT class (tests/third_party/scenic, unchanged): same parameter tree and outputs as
`create_vit`, `quantize` / `quantize_uniform` run on it unchanged, and a Scenic train-state checkpoint loads
through `lampq quantize --checkpoint`."""

import importlib
import pathlib
import sys
import types

import jax
import numpy as np
import pytest

from lampq_jax import LampQConfig, create_vit, find_layers, quantize, quantize_uniform

SCENIC_ROOT = pathlib.Path(__file__).resolve().parents[1] / "third_party" / "scenic"
CONFIG = dict(num_layers=2, hidden_size=32, mlp_dim=64, num_heads=2)


def _stand_in(name: str, **attributes) -> None:
    module = types.ModuleType(name)
    module.__dict__.update(attributes)
    sys.modules[name] = module


@pytest.fixture(scope="module")
def scenic_vit():
    """Scenic's `vit` module, with stand-ins for `tensorflow.io.gfile` (checkpoint reading) and the
    training wrapper's base class, the two imports the model itself does not use."""
    import ml_collections  # in the test extras

    saved = {k: sys.modules.get(k) for k in ("tensorflow", "tensorflow.io")}
    if importlib.util.find_spec("tensorflow") is None:
        _stand_in("tensorflow.io", gfile=types.SimpleNamespace())
        _stand_in("tensorflow", io=sys.modules["tensorflow.io"])
    _stand_in(
        "scenic.model_lib.base_models.multilabel_classification_model",
        MultiLabelClassificationModel=type("MultiLabelClassificationModel", (), {}),
    )
    sys.path.insert(0, str(SCENIC_ROOT))
    try:
        module = importlib.import_module("scenic.projects.baselines.vit")
    finally:
        sys.path.remove(str(SCENIC_ROOT))
    yield module, ml_collections
    for name, value in saved.items():
        if value is None:
            sys.modules.pop(name, None)


def _scenic_model(scenic_vit, num_classes=10, classifier="token", patch=7):
    vit, ml_collections = scenic_vit
    return vit.ViT(
        num_classes=num_classes,
        patches=ml_collections.ConfigDict({"size": (patch, patch)}),
        classifier=classifier,
        dropout_rate=0.0,
        attention_dropout_rate=0.0,
        **CONFIG,
    )


def _shapes(variables) -> dict[str, tuple[int, ...]]:
    flat = jax.tree_util.tree_flatten_with_path(variables)[0]
    return {"/".join(k.key for k in path): tuple(leaf.shape) for path, leaf in flat}


def _random_params(variables, seed=0):
    leaves, tree = jax.tree_util.tree_flatten(variables)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree_util.tree_unflatten(
        tree, [0.2 * jax.random.normal(k, l.shape, l.dtype) for k, l in zip(keys, leaves)]
    )


@pytest.mark.parametrize("classifier,num_classes", [("token", 10), ("gap", 10), ("token", None)])
def test_create_vit_has_scenic_parameter_tree_and_outputs(scenic_vit, classifier, num_classes):
    images = jax.random.normal(jax.random.key(1), (3, 28, 28, 1))
    theirs = _scenic_model(scenic_vit, num_classes=num_classes or 0, classifier=classifier)
    ours = create_vit("Ti/7", num_classes, classifier=classifier, patch_size=7, **CONFIG)
    their_vars = theirs.init(jax.random.key(0), images[:1], train=False)
    our_vars = ours.init(jax.random.key(0), images[:1])
    assert _shapes(our_vars) == _shapes(their_vars)
    params = _random_params(our_vars)
    np.testing.assert_allclose(
        np.asarray(theirs.apply(params, images, train=False)),
        np.asarray(ours.apply(params, images, train=False)),
        rtol=1e-5,
        atol=1e-5,
    )


@pytest.fixture(scope="module")
def scenic_setup(scenic_vit):
    model = _scenic_model(scenic_vit)
    images = np.asarray(jax.random.normal(jax.random.key(1), (16, 28, 28, 1)))
    return model, _random_params(model.init(jax.random.key(0), images[:1], train=False)), images


def test_scenic_layers_and_types_are_those_of_create_vit(scenic_setup):
    model, variables, images = scenic_setup
    ours = create_vit("Ti/7", 10, patch_size=7, **CONFIG)
    theirs = [(l.path, l.type, l.kind, l.weight_shape) for l in find_layers(model, variables, images[:1], train=False)]
    mine = [(l.path, l.type, l.kind, l.weight_shape) for l in find_layers(ours, variables, images[:1], train=False)]
    assert theirs == mine
    assert {t for _, t, _, _ in theirs} == {"embed", "qkv", "proj", "fc1", "fc2", "head"}


def test_quantize_and_uniform_run_on_scenic_vit_unchanged(scenic_setup):
    model, variables, images = scenic_setup
    ours = create_vit("Ti/7", 10, patch_size=7, **CONFIG)
    config = LampQConfig(progress=False, metric_check=False, iterations=1)
    theirs = quantize(model, variables, images, budget=4.0, config=config, train=False)
    mine = quantize(ours, variables, images, budget=4.0, config=config, train=False)
    assert theirs.bits == mine.bits
    np.testing.assert_allclose(np.asarray(theirs.apply(images)), np.asarray(mine.apply(images)), atol=1e-4)
    uniform = quantize_uniform(model, variables, images, 8, train=False)
    fp = np.asarray(model.apply(variables, images, train=False))
    out = np.asarray(uniform.apply(images))
    assert np.linalg.norm(out - fp) / np.linalg.norm(fp) < 0.05  # W8A8 stays close to FP


def test_scenic_train_state_checkpoint_loads_through_the_cli(scenic_setup, tmp_path):
    """Scenic's trainer saves `flax.training.checkpoints.save_checkpoint(workdir, train_state, step)`: a
    msgpack of the TrainState's state dict (global_step, opt_state, params, model_state, rng, metadata)."""
    import flax.serialization

    from lampq_jax.cli import main

    model, variables, images = scenic_setup
    state = {
        "global_step": 1000,
        "opt_state": {"mu": variables["params"], "count": 3},
        "params": variables["params"],
        "model_state": {},
        "rng": np.asarray(jax.random.key_data(jax.random.key(0))),
        "metadata": {"chrono": {"accum_train_time": 12.5}},
    }
    workdir = tmp_path / "workdir"
    workdir.mkdir()
    (workdir / "checkpoint_1000").write_bytes(flax.serialization.msgpack_serialize(state))
    np.savez(tmp_path / "calib.npz", images=images)
    (tmp_path / "model.json").write_text(
        '{"variant": "Ti/7", "num_classes": 10, "overrides": {"patch_size": 7, '
        '"num_layers": 2, "hidden_size": 32, "mlp_dim": 64, "num_heads": 2}}'
    )
    out = tmp_path / "out"
    code = main(
        [
            "quantize",
            "--checkpoint",
            str(workdir),
            "--model-config",
            str(tmp_path / "model.json"),
            "--calib",
            str(tmp_path / "calib.npz"),
            "--budget",
            "8",
            "--iterations",
            "0",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert code == 0
    from lampq_jax import load_result

    result = load_result(out / "result")  # create_vit, the model config's layout, with the train state's params
    fp = np.asarray(model.apply(variables, images, train=False))  # Scenic's own ViT
    assert np.linalg.norm(np.asarray(result.apply(images)) - fp) / np.linalg.norm(fp) < 0.05


def test_checkpoint_folder_and_train_state_errors_name_the_value(tmp_path):
    from lampq_jax.cli import checkpoint_file, variables_from_state

    with pytest.raises(FileNotFoundError, match="holds no checkpoint_<step>"):
        checkpoint_file(tmp_path)
    for step in (5, 40, 100):
        (tmp_path / f"checkpoint_{step}").write_bytes(b"")
    assert checkpoint_file(tmp_path).name == "checkpoint_100"
    with pytest.raises(ValueError, match=r"train state \(keys \['global_step', 'opt_state'\]\) but has no params"):
        variables_from_state({"global_step": 3, "opt_state": {}})
    legacy = variables_from_state({"optimizer": {"target": {"w": 1}, "state": {}}})
    assert legacy == {"params": {"w": 1}}
