import json
import os
import subprocess
import sys
from pathlib import Path

import flax.serialization
import jax
import numpy as np
import pytest

from conftest import randomize_head, tiny_vit
from invented_vit import RULES, InventedBackbone
from lampq_jax import LampQConfig, create_vit
from lampq_jax.cli import compile_cache_dir, load_calibration, main
from lampq_jax.layers import NO_ATTENTION_LINE

FAST = ["--iterations", "0", "--no-progress", "--probes", "1", "--num-calib", "8"]


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
    return [
        "quantize",
        "--checkpoint",
        str(files / "vit.msgpack"),
        "--model-config",
        str(files / "vit.json"),
        "--calib",
        str(files / "calib.npz"),
        "--out",
        str(out),
        *FAST,
        *extra,
    ]


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


def test_cli_finetune_after_lampq(files, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(args(files, out, "--finetune-steps", "3", "--finetune-batch", "4", "--finetune-lr", "1e-3")) == 0
    assert "QAT: 3 steps of optax.adam(0.001), batch 4 of 8 images" in capsys.readouterr().out
    assert "## Quantization-aware fine-tuning" in (out / "report.md").read_text()
    saved = json.loads((out / "result" / "allocation.json").read_text())
    assert saved["method"] == "lampq+qat"
    assert main(args(files, tmp_path / "bad", "--finetune-steps", "3", "--finetune-batch", "0")) == 2
    assert "--finetune-batch >= 1" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["run"]


def test_cli_holdout_measures_j_on_held_out_images(files, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(args(files, out, "--budget", "4", "--holdout", "0.25")) == 0
    assert "on 2 held-out images, fitted on 6" in (out / "report.md").read_text()
    assert main(args(files, tmp_path / "bad", "--holdout", "1.0")) == 2
    assert "holdout must be a fraction in [0, 1), got 1.0" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["run"]


def zero_shot_args(files, out, *extra):
    model = ["--checkpoint", str(files / "vit.msgpack"), "--model-config", str(files / "vit.json")]
    return ["quantize", *model, "--out", str(out), *FAST, *extra]


def test_cli_zero_shot_writes_the_synthetic_set(files, tmp_path, capsys):
    out = tmp_path / "run"
    flags = "--zero-shot 4 --zero-shot-steps 3 --image-size 28 --channels 1 --normalize unit --budget 4".split()
    assert main(zero_shot_args(files, out, *flags)) == 0
    assert "calibration: zero-shot: 4 images (28, 28, 1) synthesized in 3 steps" in capsys.readouterr().out
    assert {"zero_shot_images.npz", "zero_shot_images.png"} <= set(os.listdir(out))
    with np.load(out / "zero_shot_images.npz") as f:
        images = f["images"]
    assert images.shape == (4, 28, 28, 1) and np.all(np.isfinite(images))
    assert images.min() >= 0.0 and images.max() <= 1.0 and images.std() > 0
    assert "zero-shot" in (out / "report.md").read_text().lower()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--zero-shot", "4", "--calib", "x.npz"], "give exactly one of --calib PATH and --zero-shot N"),
        ([], "give exactly one of --calib PATH and --zero-shot N"),
        (["--zero-shot", "0", "--image-size", "28", "--normalize", "unit"], "must be >= 1, got 0 and 200"),
        (["--zero-shot", "4", "--image-size", "28"], "--zero-shot needs --image-size"),
    ],
)
def test_cli_zero_shot_errors(files, tmp_path, capsys, extra, message):
    assert main(zero_shot_args(files, tmp_path / "run", *extra)) == 2
    assert message in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------- user models and photo folders

INVENTED = str(Path(__file__).parent / "invented_vit.py") + ":build"
RULE_FLAGS = [flag for pattern, t in RULES for flag in ("--type-rule", f"{pattern}={t}")]


@pytest.fixture(scope="module")
def invented_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("invented")
    model = InventedBackbone()
    images = np.asarray(jax.random.normal(jax.random.key(1), (4, 16, 16, 3)), np.float32)
    (root / "backbone.msgpack").write_bytes(flax.serialization.to_bytes(model.init(jax.random.key(0), images[:1])))
    np.savez(root / "calib.npz", images=images)
    return root


def test_cli_type_rules_on_an_invented_model(invented_files, tmp_path, capsys):
    out = tmp_path / "run"
    argv = [
        "quantize",
        "--checkpoint",
        str(invented_files / "backbone.msgpack"),
        "--model-fn",
        INVENTED,
        "--apply-kwargs",
        "{}",
        "--calib",
        str(invented_files / "calib.npz"),
        "--output",
        "features",
        "--out",
        str(out),
        *FAST,
        *RULE_FLAGS,
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "layers by type: qkv 6, proj 2, fc1 2, fc2 2, embed 1 (13 layers)" in printed
    assert NO_ATTENTION_LINE in printed
    report = (out / "report.md").read_text()
    assert "| embed | 1 | 768 | 8 | 8 |" in report and NO_ATTENTION_LINE in report
    assert "calibration objective cosine" in report
    assert "'images' of" in report and "used as they are" in report
    assert json.loads((out / "allocation.json").read_text())["bits"]["patch_embed"] == [8, 8]
    saved = json.loads((out / "result" / "allocation.json").read_text())
    assert [tuple(r) for r in saved["type_rules"]] == list(RULES)
    assert leftovers(tmp_path) == []


def test_cli_layers_with_type_rules(capsys):
    base = ["layers", "--model-fn", INVENTED, "--apply-kwargs", "{}", "--image-size", "16"]
    assert main([*base, *RULE_FLAGS]) == 0
    printed = capsys.readouterr().out
    assert "layer_0/attn_out" in printed and "layers left as 'other': none" in printed
    assert "layers by type: qkv 6, proj 2, fc1 2, fc2 2, embed 1 (13 layers)" in printed
    assert NO_ATTENTION_LINE in printed
    with pytest.warns(UserWarning, match="--type-rule"):
        assert main(base) == 0
    assert "layers left as 'other' (no type rule matched" in capsys.readouterr().out
    assert main([*base, "--type-rule", "fc1$=mlp"]) == 2
    assert "unknown layer type 'mlp'" in capsys.readouterr().err
    assert main([*base, "--type-rule", "fc1$"]) == 2
    assert "--type-rule must be REGEX=TYPE" in capsys.readouterr().err
    assert main([*base, "--type-rule", "(=qkv"]) == 2
    assert "bad regex '('" in capsys.readouterr().err
    assert main(["layers", "--variant", "Ti/16", "--image-size", "32"]) == 0
    assert "attention matmuls quantized at 48 sites" in capsys.readouterr().out


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory):
    from PIL import Image

    from lampq_jax.data.photos import load_photo

    root = tmp_path_factory.mktemp("photos")
    for k, (name, size) in enumerate(
        [
            ("astronaut", (90, 60)),
            ("coffee", (41, 77)),
            ("rocket", (200, 150)),
            ("camera", (64, 64)),
            ("hubble_deep_field", (50, 120)),
            ("coins", (75, 40)),
        ]
    ):
        Image.fromarray(load_photo(name)).resize(size, Image.BICUBIC).save(root / f"{k}_{name}.jpg", quality=90)
    model = create_vit("Ti/7", None, num_layers=2, hidden_size=32, mlp_dim=64, num_heads=2, patch_size=7)
    variables = model.init(jax.random.key(0), np.zeros([1, 28, 28, 3], np.float32))
    (root.parent / "features.msgpack").write_bytes(flax.serialization.to_bytes(variables))
    (root.parent / "features.json").write_text(
        json.dumps(
            {
                "variant": "Ti/7",
                "num_classes": None,
                "overrides": dict(num_layers=2, hidden_size=32, mlp_dim=64, num_heads=2, patch_size=7),
            }
        )
    )
    return root


def photo_args(folder, out, *extra):
    weights, config = folder.parent / "features.msgpack", folder.parent / "features.json"
    model = ["--checkpoint", str(weights), "--model-config", str(config)]
    return ["quantize", *model, "--calib", str(folder), "--out", str(out), *FAST, *extra]


def test_cli_photo_folder_feature_backbone_end_to_end(photo_folder, tmp_path, capsys):
    out = tmp_path / "run"
    flags = "--image-size 28 --normalize imagenet --output features --budget 4".split()
    assert main(photo_args(photo_folder, out, *flags)) == 0
    assert "calibration: 6 JPEG/PNG image(s)" in capsys.readouterr().out
    report = (out / "report.md").read_text()
    assert (
        "preprocessing of the calibration images: 6 JPEG/PNG image(s) from " in report
        and "center-cropped to 28×28, normalized 'imagenet'" in report
        and "timm, Hugging Face" in report
    )
    assert "calibration objective cosine" in report and "attention matmuls quantized at 8 sites" in report
    stored = json.loads((out / "result" / "report.json").read_text())["report"]
    assert stored["config"]["output"] == "features" and "normalized 'imagenet'" in stored["preprocessing"]
    flags = "--image-size 28 --normalize minus1_1 --output features --objective kl".split()
    assert main(photo_args(photo_folder, tmp_path / "kl", *flags)) == 0
    assert "calibration objective kl" in (tmp_path / "kl" / "report.md").read_text()


def test_cli_photo_folder_errors(photo_folder, files, tmp_path, capsys):
    assert main(photo_args(photo_folder, tmp_path / "run", "--image-size", "28")) == 2
    assert "holds JPEG/PNG images; give --normalize" in capsys.readouterr().err
    assert main(args(files, tmp_path / "run", "--normalize", "unit")) == 2
    assert "--normalize: only for folders of JPEG/PNG images" in capsys.readouterr().err
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.jpg").write_bytes((photo_folder / "0_astronaut.jpg").read_bytes())
    (broken / "b.jpg").write_bytes(b"truncated")
    bad = photo_args(broken, tmp_path / "run", "--image-size", "28", "--normalize", "imagenet")
    bad[bad.index("--checkpoint") + 1] = str(photo_folder.parent / "features.msgpack")
    bad[bad.index("--model-config") + 1] = str(photo_folder.parent / "features.json")
    assert main(bad) == 2
    assert f"cannot read image {broken / 'b.jpg'}" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["broken"]


def test_load_calibration_npy_folder_used_as_is(photo_folder, tmp_path):
    arrays = np.random.default_rng(0).normal(size=(3, 5, 5, 2)).astype(np.float32)
    for k, a in enumerate(arrays):
        np.save(tmp_path / f"{k}.npy", a)
    images, labels, text = load_calibration(str(tmp_path), limit=2)
    np.testing.assert_array_equal(images, arrays[:2])
    assert labels is None and "2 .npy array(s)" in text and "no resize, no normalization" in text
    with pytest.raises(ValueError, match="--image-size: only for folders of JPEG/PNG"):
        load_calibration(str(tmp_path), image_size=28)
    (tmp_path / "x.jpg").write_bytes((photo_folder / "0_astronaut.jpg").read_bytes())
    with pytest.raises(ValueError, match=r"mixes 1 JPEG/PNG image\(s\) and 3 .npy array\(s\)"):
        load_calibration(str(tmp_path), image_size=28, normalization="unit")


def test_cli_method_options_are_lampq_config_fields():
    """Defaults come from LampQConfig; each flag and switch reaches its field."""
    from lampq_jax.cli import _config, build_parser

    base = ["quantize", "--checkpoint", "c.msgpack", "--out", "o"]
    assert _config(build_parser().parse_args(base)) == LampQConfig()
    args = build_parser().parse_args(
        base
        + [
            "--candidates",
            "8",
            "4",
            "--budget-kind",
            "bops",
            "--granularity",
            "module",
            "--alpha",
            "none",
            "--iterations",
            "1",
            "--probes",
            "2",
            "--calibration",
            "minmax",
            "--seed",
            "5",
            "--separate-wa",
            "--no-progress",
            "--metric-check",
            "--probe-bits",
            "4",
            "--output",
            "features",
            "--holdout",
            "0.25",
        ]
    )
    assert _config(args) == LampQConfig(
        candidates=(4, 8),
        budget_kind="bops",
        granularity="module",
        alpha="none",
        iterations=1,
        probes=2,
        calibration="minmax",
        seed=5,
        separate_weight_act_bits=True,
        progress=False,
        metric_check=True,
        probe_bits=4,
        output="features",
        holdout=0.25,
    )


def test_compile_cache_folder_comes_from_the_flag_then_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("LAMPQ_COMPILE_CACHE", str(tmp_path / "env"))
    assert compile_cache_dir(str(tmp_path / "flag")) == tmp_path / "flag"
    assert compile_cache_dir(None) == tmp_path / "env"
    assert compile_cache_dir("off") is None and compile_cache_dir("") is None
    monkeypatch.setenv("LAMPQ_COMPILE_CACHE", "OFF")
    assert compile_cache_dir(None) is None
    monkeypatch.delenv("LAMPQ_COMPILE_CACHE")
    assert compile_cache_dir(None) is None  # off unless asked for


def test_compile_cache_keeps_compiled_programs_between_runs(tmp_path):
    """A fresh process with the cache on writes its compiled program there; one whose jax config already
    names a cache keeps that one."""
    script = (
        "import sys, jax, jax.numpy as jnp\n"
        "from pathlib import Path\n"
        "from lampq_jax.cli import use_compile_cache\n"
        "jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)\n"
        "if sys.argv[2] == 'own': jax.config.update('jax_compilation_cache_dir', sys.argv[1] + '/own')\n"
        "print(use_compile_cache(Path(sys.argv[1]) / 'cli'))\n"
        "jax.jit(lambda x: jnp.sin(x) @ x.T)(jnp.ones((4, 4))).block_until_ready()\n"
    )
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    for mode in ("cli", "own"):
        out = subprocess.run(
            [sys.executable, "-c", script, str(tmp_path), mode], capture_output=True, text=True, env=env, check=True
        )
        assert out.stdout.strip() == str(tmp_path / mode)
        assert any(p.is_file() for p in (tmp_path / mode).rglob("*")), f"nothing cached in {tmp_path / mode}"
    assert not (tmp_path / "cli" / "own").exists()
