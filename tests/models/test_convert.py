"""Converters into the Scenic layout: numerical equality with timm / Hugging Face, exact round trips."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import unflatten_dict

from lampq_jax.models import build_model, from_augreg_npz, from_big_vision, from_huggingface, from_timm
from lampq_jax.models import resize_pos_embedding, unstack_scanned
from lampq_jax.models.vit import create_vit

TOL = 1e-4  # max abs difference to the reference framework, float32


# ----------------------------------------------------------------------------------------------
# Helpers.


def _torch():
    return pytest.importorskip("torch")


def _randomize(module, seed: int = 0):
    """Overwrites every parameter with random values (also the zero-initialized heads and biases)."""
    torch = _torch()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module_ in module.modules():
            if isinstance(module_, torch.nn.LayerNorm):
                module_.weight.copy_(1.0 + 0.1 * torch.randn(module_.weight.shape, generator=gen))
                module_.bias.copy_(0.1 * torch.randn(module_.bias.shape, generator=gen))
        for name, param in module.named_parameters():
            if re.search(r"(norm\d?|layernorm(_before|_after)?)\.(weight|bias)$", name):
                continue
            if name.endswith(("gamma", "lambda1")):
                param.copy_(0.5 + 0.2 * torch.randn(param.shape, generator=gen))
            else:
                param.copy_(0.1 * torch.randn(param.shape, generator=gen))
    return module.eval()


def _images(size: int, batch: int = 2, seed: int = 0):
    """The same random images as torch NCHW and numpy NHWC."""
    torch = _torch()
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))
    return x, x.numpy().transpose(0, 2, 3, 1)


_APPLY_CACHE: dict = {}


def _run(variables, config, images_nhwc) -> np.ndarray:
    """`build_model(config).apply` under `jit`, compiled once per config (the models are small)."""
    key = tuple(sorted(config.items()))
    if key not in _APPLY_CACHE:
        _APPLY_CACHE[key] = jax.jit(build_model(config).apply)
    return np.asarray(_APPLY_CACHE[key](variables, images_nhwc))


def _assert_close(ours: np.ndarray, reference, tol: float = TOL):
    reference = np.asarray(reference.detach()) if hasattr(reference, "detach") else np.asarray(reference)
    assert ours.shape == reference.shape
    assert np.abs(ours - reference).max() <= tol, np.abs(ours - reference).max()


def _flat(tree, prefix=""):
    out = {}
    for key, value in tree.items():
        path = f"{prefix}/{key}" if prefix else key
        if isinstance(value, dict):
            out.update(_flat(value, path))
        else:
            out[path] = np.asarray(value)
    return out


def _assert_trees_equal(a, b):
    fa, fb = _flat(a), _flat(b)
    assert sorted(fa) == sorted(fb)
    for key in fa:
        assert fa[key].shape == fb[key].shape, key
        np.testing.assert_array_equal(fa[key], fb[key], err_msg=key)


# ----------------------------------------------------------------------------------------------
# timm.


def _timm_vit(**kw):
    pytest.importorskip("timm")
    from timm.models.vision_transformer import VisionTransformer

    args = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, num_classes=10)
    return _randomize(VisionTransformer(**{**args, **kw}))


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "deit_tiny_patch16_224"])
def test_timm_named_models_match(name):
    timm = pytest.importorskip("timm")
    torch = _torch()
    reference = _randomize(timm.create_model(name, pretrained=False))
    x, x_nhwc = _images(224, batch=1)
    variables, config = from_timm(reference.state_dict(), num_heads=3)
    assert config["num_layers"] == 12 and config["hidden_size"] == 192 and config["mlp_dim"] == 768
    assert config["num_classes"] == 1000 and config["gelu_approximate"] is False
    with torch.no_grad():
        _assert_close(_run(variables, config, x_nhwc), reference(x))


def test_timm_layer_scale_and_no_embed_class_match():
    torch = _torch()
    reference = _timm_vit(init_values=0.1, no_embed_class=True, mlp_ratio=3.0)
    x, x_nhwc = _images(32)
    variables, config = from_timm(reference.state_dict(), num_heads=4)
    assert config["layer_scale_init"] is not None and config["mlp_dim"] == 192
    block = variables["params"]["Transformer"]["encoderblock_1"]
    assert block["LayerScale_0"]["scale"].shape == (64,)
    pos = variables["params"]["Transformer"]["posembed_input"]["pos_embedding"]
    assert pos.shape == (1, 17, 64) and not pos[0, 0].any()  # zero row for cls
    with torch.no_grad():
        _assert_close(_run(variables, config, x_nhwc), reference(x))


def test_timm_gap_and_features_match():
    torch = _torch()
    reference = _timm_vit(class_token=False, global_pool="avg", fc_norm=False, qkv_bias=False, num_classes=0)
    x, x_nhwc = _images(32)
    variables, config = from_timm(reference.state_dict(), num_heads=4)
    assert config["classifier"] == "gap" and config["num_classes"] is None
    assert not variables["params"]["Transformer"]["encoderblock_0"]["MultiHeadDotProductAttention_0"]["query"][
        "bias"
    ].any()
    with torch.no_grad():
        _assert_close(_run(variables, config, x_nhwc), reference(x))


def test_timm_distilled_needs_opt_in_and_then_matches_cls_path():
    torch = _torch()
    pytest.importorskip("timm")
    from timm.models.deit import VisionTransformerDistilled

    reference = _randomize(
        VisionTransformerDistilled(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, num_classes=10)
    )
    with pytest.raises(ValueError, match="distilled_cls_only"):
        from_timm(reference.state_dict(), num_heads=4)
    variables, config = from_timm(reference.state_dict(), num_heads=4, distilled_cls_only=True)
    assert config["distillation_token"] and "dist" in variables["params"]
    x, x_nhwc = _images(32)
    with torch.no_grad():
        expected = reference.head(reference.forward_features(x)[:, 0])
    _assert_close(_run(variables, config, x_nhwc), expected)


def test_timm_missing_and_unexpected_keys_are_named():
    reference = _timm_vit()
    state = dict(reference.state_dict())
    del state["blocks.1.mlp.fc2.bias"]
    state["blocks.0.attn.q_norm.weight"] = state["norm.weight"]
    with pytest.raises(ValueError, match=r"Missing keys \(1\): \['blocks\.1\.mlp\.fc2\.bias'\]") as err:
        from_timm(state, num_heads=4)
    assert "Unexpected keys (1): ['blocks.0.attn.q_norm.weight']" in str(err.value)
    fc_norm = _timm_vit(class_token=False, global_pool="avg").state_dict()
    with pytest.raises(ValueError, match="fc_norm"):
        from_timm(fc_norm, num_heads=4)
    with pytest.raises(ValueError, match="not divisible"):
        from_timm(reference.state_dict(), num_heads=5)


def test_timm_image_size_resizes_position_embedding():
    reference = _timm_vit()
    variables, config = from_timm(reference.state_dict(), num_heads=4, image_size=48)
    pos = variables["params"]["Transformer"]["posembed_input"]["pos_embedding"]
    assert pos.shape == (1, 1 + 36, 64)
    np.testing.assert_array_equal(pos[:, :1], reference.pos_embed.detach().numpy()[:, :1])
    assert _run(variables, config, np.zeros([1, 48, 48, 3], np.float32)).shape == (1, 10)


# ----------------------------------------------------------------------------------------------
# Hugging Face.

_HF_SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8)


def _hf(kind: str, **kw):
    transformers = pytest.importorskip("transformers")
    _torch()
    if kind == "dinov2":
        config = transformers.Dinov2Config(**_HF_SMALL, mlp_ratio=2, **kw)
        return _randomize(transformers.Dinov2Model(config)), config
    cfg_cls = transformers.ViTConfig if kind.startswith("vit") else transformers.DeiTConfig
    config = cfg_cls(**_HF_SMALL, intermediate_size=96, num_labels=7, **kw)
    model_cls = {
        "vit": transformers.ViTModel,
        "vit_cls": transformers.ViTForImageClassification,
        "deit": transformers.DeiTModel,
        "deit_cls": transformers.DeiTForImageClassification,
    }[kind]
    return _randomize(model_cls(config)), config


def _hf_output(kind, reference, x):
    torch = _torch()
    with torch.no_grad():
        out = reference(pixel_values=x)
    return out.logits if kind.endswith("_cls") else out.pooler_output


@pytest.mark.parametrize("kind", ["vit", "vit_cls", "deit", "deit_cls", "dinov2"])
def test_huggingface_models_match(kind):
    reference, hf_config = _hf(kind)
    x, x_nhwc = _images(32)
    variables, config = from_huggingface(reference.state_dict(), hf_config)
    assert config["num_layers"] == 2 and config["num_heads"] == 4
    assert config["layer_norm_epsilon"] == (1e-6 if kind == "dinov2" else 1e-12)
    assert config["num_classes"] == (7 if kind.endswith("_cls") else None)
    assert config["representation_size"] == (64 if kind in ("vit", "deit") else None)
    assert config["distillation_token"] == kind.startswith("deit")
    assert (config["layer_scale_init"] is not None) == (kind == "dinov2")
    _assert_close(_run(variables, config, x_nhwc), _hf_output(kind, reference, x))


def _to_transformers_v4_names(state, dinov2: bool):
    """Renames a transformers 5.x state dict to the 4.x names of Hub checkpoints."""
    renames = [
        (rf"attention\.{x}_proj\.", f"attention.attention.{name}.")
        for x, name in (("q", "query"), ("k", "key"), ("v", "value"))
    ]
    renames.append((r"attention\.o_proj\.", "attention.output.dense."))
    if not dinov2:  # 4.x DINOv2 already used encoder.layer.i / mlp.fc1 / mlp.fc2
        renames += [(r"(^|\.)layers\.(\d+)\.", r"\1encoder.layer.\2."), (r"\.mlp\.fc1\.", ".intermediate.dense.")]
        renames.append((r"\.mlp\.fc2\.", ".output.dense."))
    out = {}
    for key, value in state.items():
        for old, new in renames:
            key = re.sub(old, new, key)
        out[key] = value
    return out


@pytest.mark.parametrize("kind", ["vit_cls", "dinov2"])
def test_huggingface_transformers_v4_names_match(kind):
    reference, hf_config = _hf(kind)
    v4 = _to_transformers_v4_names(reference.state_dict(), dinov2=kind == "dinov2")
    prefix = "vit." if kind == "vit_cls" else ""
    assert f"{prefix}encoder.layer.1.attention.attention.query.weight" in v4
    x, x_nhwc = _images(32)
    variables, config = from_huggingface(v4, hf_config.to_dict())
    _assert_close(_run(variables, config, x_nhwc), _hf_output(kind, reference, x))


def test_huggingface_without_qkv_bias_matches():
    reference, hf_config = _hf("vit_cls", qkv_bias=False)
    x, x_nhwc = _images(32)
    variables, config = from_huggingface(reference.state_dict(), hf_config)
    _assert_close(_run(variables, config, x_nhwc), _hf_output("vit_cls", reference, x))


def test_huggingface_missing_and_unexpected_keys_are_named():
    reference, hf_config = _hf("vit_cls")
    state = dict(reference.state_dict())
    del state["vit.layers.1.attention.k_proj.weight"]
    state["vit.layers.0.extra.weight"] = state["vit.layernorm.weight"]
    with pytest.raises(ValueError, match=r"Missing keys \(1\): \['layers\.1\.attention\.k_proj\.weight'\]") as err:
        from_huggingface(state, hf_config)
    assert "Unexpected keys (1): ['layers.0.extra.weight']" in str(err.value)
    with pytest.raises(ValueError, match="hidden_act"):
        from_huggingface(reference.state_dict(), {**hf_config.to_dict(), "hidden_act": "relu"})


# ----------------------------------------------------------------------------------------------
# AugReg .npz and big_vision: round trips of trees written here.


def _scenic(classifier="token", representation_size=32, num_classes=5):
    model = create_vit(
        "Ti/8",
        num_classes,
        hidden_size=64,
        num_layers=3,
        mlp_dim=96,
        num_heads=4,
        classifier=classifier,
        representation_size=representation_size,
    )
    # Random values for every leaf (shapes from eval_shape: no initializer is compiled or run).
    shapes = jax.eval_shape(model.init, jax.random.key(1), jnp.zeros([1, 32, 32, 3]))["params"]
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: rng.normal(0.0, 0.1, s.shape).astype(np.float32), shapes)
    return model, {"params": params}


def _expected_config(model):
    names = ["num_classes", "hidden_size", "num_layers", "mlp_dim", "num_heads", "patch_size", "classifier"]
    names += ["representation_size", "distillation_token", "layer_scale_init", "layer_norm_epsilon", "gelu_approximate"]
    return {n: getattr(model, n) for n in names}


def _to_augreg(params):
    flat = {}
    for key, value in _flat(params).items():
        key = key.replace("MultiHeadDotProductAttention_0", "MultiHeadDotProductAttention_1")
        key = key.replace("MlpBlock_0", "MlpBlock_3").replace("LayerNorm_1", "LayerNorm_2")
        flat[re.sub(r"^output_projection/", "head/", key)] = value
    return flat


@pytest.mark.parametrize("classifier", ["token", "gap"])
def test_augreg_npz_round_trip(tmp_path, classifier):
    model, variables = _scenic(classifier, representation_size=32 if classifier == "token" else None)
    flat = _to_augreg(variables["params"])
    assert "Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel" in flat and "head/kernel" in flat
    path = tmp_path / "augreg.npz"
    np.savez(path, **flat)
    converted, config = from_augreg_npz(path)
    _assert_trees_equal(converted["params"], variables["params"])
    assert config == _expected_config(model)
    images = np.random.default_rng(1).normal(size=(2, 32, 32, 3)).astype(np.float32)
    assert np.isfinite(_run(converted, config, images)).all()
    # A dict with Scenic (Linen) names is accepted as well.
    converted, _ = from_augreg_npz(_flat(variables["params"]))
    _assert_trees_equal(converted["params"], variables["params"])
    # image_size= resizes the position embedding and keeps cls.
    resized, resized_config = from_augreg_npz(flat, image_size=(48, 64))
    pos = resized["params"]["Transformer"]["posembed_input"]["pos_embedding"]
    num_prefix = 1 if classifier == "token" else 0
    assert pos.shape == (1, num_prefix + 6 * 8, 64) and resized_config == config
    np.testing.assert_array_equal(pos[:, :num_prefix], flat["Transformer/posembed_input/pos_embedding"][:, :num_prefix])
    assert _run(resized, config, np.zeros([1, 48, 64, 3], np.float32)).shape == (1, 5)


def test_augreg_missing_and_unexpected_keys_are_named():
    _, variables = _scenic()
    flat = _to_augreg(variables["params"])
    del flat["Transformer/encoderblock_2/LayerNorm_2/scale"]
    flat["conv_root/kernel"] = np.zeros([7, 7, 3, 64])
    missing = r"Missing keys \(1\): \['Transformer/encoderblock_2/LayerNorm_2/scale'\]"
    with pytest.raises(ValueError, match=missing) as err:
        from_augreg_npz(flat)
    assert "Unexpected keys (1): ['conv_root/kernel']" in str(err.value)


def _to_big_vision(params, scan=False):
    """Scenic → big_vision names: top-level patch-only `pos_embedding`, `head`, optionally scanned."""
    flat = _flat(params)
    pos = flat.pop("Transformer/posembed_input/pos_embedding")
    num_prefix = 1 if "cls" in flat else 0
    assert not pos[:, :num_prefix].any(), "big_vision has no cls position: zero it in the source"
    out = {"pos_embedding": pos[:, num_prefix:]}
    for key, value in flat.items():
        out[re.sub(r"^output_projection/", "head/", key)] = value
    if scan:
        stacked = {}
        for key in [k for k in out if k.startswith("Transformer/encoderblock_")]:
            i, rest = re.match(r"Transformer/encoderblock_(\d+)/(.*)", key).groups()
            stacked.setdefault(rest, {})[int(i)] = out.pop(key)
        for rest, by_layer in stacked.items():
            out[f"Transformer/encoderblock/{rest}"] = np.stack([by_layer[i] for i in sorted(by_layer)])
    return unflatten_dict(out, sep="/")


@pytest.mark.parametrize("scan", [False, True])
@pytest.mark.parametrize("classifier", ["token", "gap"])
def test_big_vision_round_trip(scan, classifier):
    model, variables = _scenic(classifier)
    pos = variables["params"]["Transformer"]["posembed_input"]["pos_embedding"]
    if classifier == "token":
        pos[:, 0] = 0.0  # big_vision adds no position to cls
    tree = _to_big_vision(variables["params"], scan=scan)
    if scan:
        assert tree["Transformer"]["encoderblock"]["MlpBlock_0"]["Dense_0"]["kernel"].shape == (3, 64, 96)
    converted, config = from_big_vision({"params": tree} if scan else tree)
    _assert_trees_equal(converted["params"], variables["params"])
    assert config == _expected_config(model)
    images = np.random.default_rng(2).normal(size=(1, 32, 32, 3)).astype(np.float32)
    assert _run(converted, config, images).shape == (1, 5)


def test_unstack_scanned_splits_the_leading_axis():
    layer_norm = {"LayerNorm_0": {"scale": np.arange(6.0).reshape(3, 2)}}
    stacked = {"Transformer": {"encoderblock": layer_norm}, "cls": np.ones(2)}
    out = unstack_scanned(stacked)
    assert sorted(out["Transformer"]) == ["encoderblock_0", "encoderblock_1", "encoderblock_2"]
    np.testing.assert_array_equal(out["Transformer"]["encoderblock_2"]["LayerNorm_0"]["scale"], [4.0, 5.0])
    np.testing.assert_array_equal(out["cls"], np.ones(2))
    bad = {"Transformer": {"encoderblock": {"a": np.zeros([3, 2]), "b": np.zeros([4, 2])}}}
    with pytest.raises(ValueError, match="disagree on depth"):
        unstack_scanned(bad)


def test_big_vision_sincos2d_map_head_and_missing_keys():
    _, variables = _scenic("gap")
    tree = _to_big_vision(variables["params"])
    del tree["pos_embedding"]
    with pytest.raises(ValueError, match=r"Missing keys \(1\): \['pos_embedding'\].*sincos2d"):
        from_big_vision(tree)
    converted, config = from_big_vision(tree, posemb="sincos2d", image_size=32)
    pos = converted["params"]["Transformer"]["posembed_input"]["pos_embedding"]
    quarter = 16
    assert pos.shape == (1, 16, 64)
    # Grid position (0, 0): sin parts 0, cos parts 1; (row 0, column 1): x-sines at frequency 1 first.
    np.testing.assert_allclose(pos[0, 0], np.tile(np.repeat([0.0, 1.0], quarter), 2), atol=1e-7)
    np.testing.assert_allclose(pos[0, 1, 0], np.sin(1.0), rtol=1e-6)
    np.testing.assert_allclose(pos[0, 4, 2 * quarter], np.sin(1.0), rtol=1e-6)  # (row 1, column 0): y-sine
    assert _run(converted, config, np.zeros([1, 32, 32, 3], np.float32)).shape == (1, 5)
    tree = _to_big_vision(variables["params"])
    tree["MAPHead_0"] = {"probe": np.zeros([1, 1, 64])}
    with pytest.raises(ValueError, match="MAPHead_0/probe"):
        from_big_vision(tree)
    tree = _to_big_vision(variables["params"], scan=True)
    del tree["head"]["bias"]
    tree["extra"] = np.zeros(3)
    with pytest.raises(ValueError, match=r"Missing keys \(1\): \['head/bias'\]. Unexpected keys \(1\): \['extra'\]"):
        from_big_vision(tree)


# ----------------------------------------------------------------------------------------------
# Position embedding resizing and build_model.


def test_resize_pos_embedding_keeps_prefix_and_resizes_grid():
    posemb = np.random.default_rng(0).normal(size=(1, 2 + 16, 8)).astype(np.float32)
    same = resize_pos_embedding(posemb, (4, 4), num_prefix_tokens=2)
    np.testing.assert_array_equal(same, posemb)
    bigger = resize_pos_embedding(posemb, (6, 8), num_prefix_tokens=2)
    assert bigger.shape == (1, 2 + 48, 8)
    np.testing.assert_array_equal(bigger[:, :2], posemb[:, :2])
    constant = np.concatenate([posemb[:, :1], np.full((1, 16, 8), 0.5, np.float32)], axis=1)
    np.testing.assert_allclose(resize_pos_embedding(constant, (7, 7), 1)[:, 1:], 0.5, rtol=1e-6)
    with pytest.raises(ValueError, match="not a square grid"):
        resize_pos_embedding(posemb[:, :-1], (4, 4), num_prefix_tokens=2)


def test_build_model_rejects_unknown_options():
    with pytest.raises(TypeError, match="image_size"):
        build_model(dict(num_classes=3, hidden_size=8, num_layers=1, mlp_dim=8, num_heads=2, image_size=32))
