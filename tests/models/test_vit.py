"""The Scenic-layout ViT: exact parameter paths and shapes, variant decoding, options, errors."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lampq_jax.models.vit import VIT_SIZES, ViT, create_vit, decode_variant


def _param_shapes(model: ViT, image_size: int = 224) -> dict[str, tuple[int, ...]]:
    """`{"a/b/c": shape}` of the model's params, from `jax.eval_shape` (nothing is computed)."""
    variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros([1, image_size, image_size, 3]))
    assert set(variables) == {"params"}
    flat = jax.tree_util.tree_flatten_with_path(variables["params"])[0]
    return {"/".join(k.key for k in path): tuple(leaf.shape) for path, leaf in flat}


def test_b16_has_scenic_paths_shapes_and_parameter_count():
    shapes = _param_shapes(create_vit("B/16", 1000, representation_size=768))
    prefix0 = "Transformer/encoderblock_0/"
    block0 = {k[len(prefix0) :]: v for k, v in shapes.items() if k.startswith(prefix0)}
    assert block0 == {
        "LayerNorm_0/scale": (768,),
        "LayerNorm_0/bias": (768,),
        "MultiHeadDotProductAttention_0/query/kernel": (768, 12, 64),
        "MultiHeadDotProductAttention_0/query/bias": (12, 64),
        "MultiHeadDotProductAttention_0/key/kernel": (768, 12, 64),
        "MultiHeadDotProductAttention_0/key/bias": (12, 64),
        "MultiHeadDotProductAttention_0/value/kernel": (768, 12, 64),
        "MultiHeadDotProductAttention_0/value/bias": (12, 64),
        "MultiHeadDotProductAttention_0/out/kernel": (12, 64, 768),
        "MultiHeadDotProductAttention_0/out/bias": (768,),
        "LayerNorm_1/scale": (768,),
        "LayerNorm_1/bias": (768,),
        "MlpBlock_0/Dense_0/kernel": (768, 3072),
        "MlpBlock_0/Dense_0/bias": (3072,),
        "MlpBlock_0/Dense_1/kernel": (3072, 768),
        "MlpBlock_0/Dense_1/bias": (768,),
    }
    blocks = {k.split("/")[1] for k in shapes if k.startswith("Transformer/encoderblock_")}
    assert blocks == {f"encoderblock_{i}" for i in range(12)}
    for i in range(12):
        prefix = f"Transformer/encoderblock_{i}/"
        assert {k[len(prefix) :]: v for k, v in shapes.items() if k.startswith(prefix)} == block0
    others = {k: v for k, v in shapes.items() if not k.startswith("Transformer/encoderblock_")}
    assert others == {
        "embedding/kernel": (16, 16, 3, 768),
        "embedding/bias": (768,),
        "cls": (1, 1, 768),
        "Transformer/posembed_input/pos_embedding": (1, 197, 768),
        "Transformer/encoder_norm/scale": (768,),
        "Transformer/encoder_norm/bias": (768,),
        "pre_logits/kernel": (768, 768),
        "pre_logits/bias": (768,),
        "output_projection/kernel": (768, 1000),
        "output_projection/bias": (1000,),
    }
    assert {k.split("/")[0] for k in shapes} == {"embedding", "cls", "Transformer", "pre_logits", "output_projection"}
    assert sum(math.prod(s) for s in shapes.values()) == 87_158_248


@pytest.mark.parametrize(
    "variant, expected",
    [
        ("Ti/16", (192, 12, 768, 3, (16, 16))),
        ("S/16", (384, 12, 1536, 6, (16, 16))),
        ("L/16", (1024, 24, 4096, 16, (16, 16))),
        ("S/14", (384, 12, 1536, 6, (14, 14))),
        ("B/8", (768, 12, 3072, 12, (8, 8))),
    ],
)
def test_variants_decode(variant, expected):
    names = ("hidden_size", "num_layers", "mlp_dim", "num_heads", "patch_size")
    assert decode_variant(variant) == dict(zip(names, expected))
    model = create_vit(variant, 10)
    assert tuple(getattr(model, n) for n in names) == expected
    assert VIT_SIZES[variant.split("/")[0]] == expected[:4]


def test_s14_patch_and_token_count():
    shapes = _param_shapes(create_vit("S/14", 10))
    assert shapes["embedding/kernel"] == (14, 14, 3, 384)
    assert shapes["Transformer/posembed_input/pos_embedding"] == (1, 1 + 16 * 16, 384)


@pytest.mark.parametrize("variant", ["X/16", "B16", "B/", "b/16", ""])
def test_unknown_variant_raises_naming_it(variant):
    with pytest.raises(ValueError, match=f"unknown ViT variant {variant!r}"):
        create_vit(variant, 10)


def test_unknown_override_raises_naming_it():
    with pytest.raises(TypeError, match=r"\['image_size', 'n_layers'\]"):
        create_vit("Ti/16", 10, n_layers=3, image_size=224)


def test_overrides_apply_and_int_patch_size_becomes_pair():
    model = create_vit("Ti/16", 10, num_layers=2, patch_size=8)
    assert model.num_layers == 2 and model.patch_size == (8, 8)


def test_gap_classifier_has_no_cls_and_no_cls_position():
    shapes = _param_shapes(create_vit("Ti/16", 10, classifier="gap"))
    assert "cls" not in shapes
    assert shapes["Transformer/posembed_input/pos_embedding"] == (1, 196, 192)


def test_layer_scale_adds_two_scales_per_block():
    shapes = _param_shapes(create_vit("mu/8", 10, num_layers=2, layer_scale_init=1e-5), image_size=16)
    for i in range(2):
        assert shapes[f"Transformer/encoderblock_{i}/LayerScale_0/scale"] == (32,)
        assert shapes[f"Transformer/encoderblock_{i}/LayerScale_1/scale"] == (32,)
    without = _param_shapes(create_vit("mu/8", 10, num_layers=2), image_size=16)
    added = {f"Transformer/encoderblock_{i}/LayerScale_{j}/scale" for i in range(2) for j in range(2)}
    assert set(shapes) - set(without) == added


def test_distillation_token_follows_cls():
    shapes = _param_shapes(create_vit("mu/8", 10, distillation_token=True), image_size=16)
    assert shapes["cls"] == shapes["dist"] == (1, 1, 32)
    assert shapes["Transformer/posembed_input/pos_embedding"] == (1, 2 + 4, 32)


def test_num_classes_none_has_no_head_and_returns_features():
    model = create_vit("mu/8", None, representation_size=24)
    shapes = _param_shapes(model, image_size=16)
    assert not any(k.startswith("output_projection") for k in shapes)
    out = jax.eval_shape(model.init_with_output, jax.random.key(0), jnp.zeros([3, 16, 16, 3]))[0]
    assert out.shape == (3, 24)
    plain = create_vit("mu/8", None)
    out = jax.eval_shape(plain.init_with_output, jax.random.key(0), jnp.zeros([3, 16, 16, 3]))[0]
    assert out.shape == (3, 32)


@pytest.mark.parametrize("classifier", ["token", "gap"])
def test_apply_on_nhwc_images_returns_logits(classifier):
    model = create_vit("mu/8", 7, classifier=classifier)
    images = jnp.asarray(np.random.default_rng(0).normal(size=(2, 16, 16, 3)), jnp.float32)
    shapes = jax.eval_shape(model.init, jax.random.key(0), images)  # random values, no init compiled
    rng = np.random.default_rng(1)
    variables = jax.tree.map(lambda s: rng.normal(0.0, 0.2, s.shape).astype(np.float32), shapes)
    logits = jax.jit(model.apply)(variables, images)
    assert logits.shape == (2, 7) and logits.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(logits)))


def test_rank3_input_raises():
    model = create_vit("mu/8", 7)
    with pytest.raises(ValueError, match=r"rank 4.*\(16, 16, 3\)"):
        model.init(jax.random.key(0), jnp.zeros([16, 16, 3]))
