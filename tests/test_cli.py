import json
import os

import flax.serialization
import jax
import numpy as np
import pytest

from conftest import randomize_head, tiny_vit
from lampq_jax.cli import main

FAST = ["--iterations", "0", "--no-progress", "--no-metric-check", "--probes", "1", "--num-calib", "8"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    model = tiny_vit()
    images = np.asarray(jax.random.normal(jax.random.key(1), (8, 28, 28, 1)), np.float32)
    variables = randomize_head(model.init(jax.random.key(0), images[:1]))
    (root / "vit.msgpack").write_bytes(flax.serialization.to_bytes(variables))
    overrides = dict(num_layers=2, hidden_size=32, mlp_dim=64, num_heads=2, patch_size=7)
    (root / "vit.json").write_text(json.dumps({"variant": "Ti/7", "num_classes": 10, "overrides": overrides}))
    np.savez(root / "calib.npz", images=images, labels=np.arange(8) % 10)
    (root / "broken.npz").write_bytes(b"this is not a zip file")
    return root


def args(files, out, *extra):
    return ["quantize", "--checkpoint", str(files / "vit.msgpack"), "--model-config", str(files / "vit.json"),
            "--calib", str(files / "calib.npz"), "--out", str(out), *FAST, *extra]


def leftovers(folder):
    return sorted(p for p in os.listdir(folder) if p.startswith("."))


def test_quantize_writes_outputs_and_evaluate_reads_them(files, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(args(files, out, "--budget", "4")) == 0
    assert sorted(os.listdir(out)) == ["allocation.json", "bits.png", "report.md", "result"]
    allocation = json.loads((out / "allocation.json").read_text())
    assert allocation["avg_weight_bits_allocated"] <= 4.0 + 1e-9
    assert "## Layers" in (out / "report.md").read_text()
    assert main(["evaluate", "--result", str(out / "result"), "--data", str(files / "calib.npz")]) == 0
    assert "accuracy of" in capsys.readouterr().out
    assert main(args(files, out, "--budget", "4")) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert leftovers(tmp_path) == []


def test_wrong_checkpoint_path(files, tmp_path, capsys):
    out = tmp_path / "run"
    bad = args(files, out)
    bad[bad.index("--checkpoint") + 1] = str(tmp_path / "missing.msgpack")
    assert main(bad) == 2
    assert "missing.msgpack does not exist" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


def test_infeasible_budget_leaves_nothing(files, tmp_path, capsys):
    assert main(args(files, tmp_path / "run", "--budget", "1.5")) == 2
    assert "smallest feasible average is 2.0 bits" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


def test_malformed_calibration_file(files, tmp_path, capsys):
    bad = args(files, tmp_path / "run")
    bad[bad.index("--calib") + 1] = str(files / "broken.npz")
    assert main(bad) == 2
    assert "broken.npz is not a readable .npz file" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []
