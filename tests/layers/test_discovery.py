import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from lampq_jax import create_vit, find_layers
from lampq_jax.layers import BUILTIN_RULES, layer_type
from lampq_jax.layers.types import check_rules


@pytest.fixture(scope="module")
def vit_b16():
    model = create_vit("B/16", 1000, representation_size=768)
    images = jnp.zeros([1, 224, 224, 3])
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), images, train=False))
    return model, variables, images


def test_vit_b16_layers_types_groups_and_macs(vit_b16):
    model, variables, images = vit_b16
    layers = find_layers(model, variables, images, train=False)
    assert len(layers) == 1 + 12 * 6 + 2
    by_path = {l.path: l for l in layers}
    for i in range(12):
        attn = f"Transformer/encoderblock_{i}/MultiHeadDotProductAttention_0"
        for name in ("query", "key", "value"):
            l = by_path[f"{attn}/{name}"]
            assert (l.kind, l.type, l.group) == ("dense_general", "qkv", f"{attn}/qkv")
            assert l.weight_shape == (768, 12, 64) and l.out_axes == (1, 2)
            assert l.macs == 197 * 768 * 768
        out = by_path[f"{attn}/out"]
        assert (out.type, out.weight_shape, out.out_axes, out.group) == ("proj", (12, 64, 768), (2,), out.path)
        assert out.macs == 197 * 768 * 768
        fc1 = by_path[f"Transformer/encoderblock_{i}/MlpBlock_0/Dense_0"]
        fc2 = by_path[f"Transformer/encoderblock_{i}/MlpBlock_0/Dense_1"]
        assert (fc1.type, fc1.weight_shape, fc1.macs) == ("fc1", (768, 3072), 197 * 768 * 3072)
        assert (fc2.type, fc2.weight_shape, fc2.macs) == ("fc2", (3072, 768), 197 * 3072 * 768)
        assert fc1.num_activations == 197 * 768 and fc2.num_activations == 197 * 3072
    embed = by_path["embedding"]
    assert (embed.kind, embed.type, embed.macs) == ("conv", "embed", 14 * 14 * 16 * 16 * 3 * 768)
    assert by_path["pre_logits"].type == "head" and by_path["output_projection"].type == "head"
    assert by_path["output_projection"].macs == 768 * 1000
    assert len({l.group for l in layers if l.type == "qkv"}) == 12


class Invented(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Dense(8, name="mixer_in")(x)
        x = nn.relu(x)
        x = nn.Dense(8, name="mixer_out")(x)
        return nn.Einsum((8, 3), "btd,dc->btc", name="readout")(x)


def test_invented_names_need_user_rules():
    model, x = Invented(), jnp.ones([2, 5, 4])
    variables = model.init(jax.random.key(0), x)
    with pytest.warns(UserWarning, match="mixer_in"):
        layers = find_layers(model, variables, x)
    assert {l.type for l in layers} == {"other"}
    with pytest.raises(ValueError, match="pass rules"):
        find_layers(model, variables, x, strict=True)
    rules = [(r"mixer_in$", "fc1"), (r"mixer_out$", "fc2"), (r"readout$", "head")]
    layers = find_layers(model, variables, x, rules=rules, strict=True)
    assert [l.type for l in layers] == ["fc1", "fc2", "head"]
    readout = layers[2]
    assert readout.kind == "einsum" and readout.out_axes == (1,) and readout.macs == 5 * 8 * 3


def test_user_rules_take_precedence_and_are_checked():
    compiled = check_rules([(r"Dense_0$", "other")] + list(BUILTIN_RULES))
    assert layer_type("Transformer/encoderblock_0/MlpBlock_0/Dense_0", compiled) == "other"
    with pytest.raises(ValueError, match="'mlp'"):
        check_rules([(r"x", "mlp")])
    with pytest.raises(ValueError, match=r"bad regex '\('"):
        check_rules([("(", "fc1")])


def test_model_without_layers_is_an_error():
    class NoLayers(nn.Module):
        @nn.compact
        def __call__(self, x):
            return x * self.param("s", nn.initializers.ones, (3,))

    model, x = NoLayers(), jnp.ones([2, 3])
    with pytest.raises(ValueError, match="NoLayers has no quantizable layer"):
        find_layers(model, model.init(jax.random.key(0), x), x)


def test_shared_layer_is_listed_once_with_calls():
    class Twice(nn.Module):
        @nn.compact
        def __call__(self, x):
            dense = nn.Dense(4, name="shared")
            return dense(dense(x))

    model, x = Twice(), jnp.ones([3, 4])
    (layer,) = find_layers(model, model.init(jax.random.key(0), x), x, rules=[("shared", "other")])
    assert layer.calls == 2 and layer.macs == 2 * 16


def test_scanned_layers_are_refused_with_advice():
    class Block(nn.Module):
        @nn.compact
        def __call__(self, x, _):
            return nn.Dense(4, name="fc")(x), None

    class Scanned(nn.Module):
        @nn.compact
        def __call__(self, x):
            stack = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
            return stack(name="encoderblock")(x, None)[0]

    model, x = Scanned(), jnp.ones([2, 4])
    variables = model.init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="stacked by nn.scan.*unstack_scanned"):
        find_layers(model, variables, x, rules=[("fc", "fc1")])


def test_cli_entry_point_installed():
    bin_dir = Path(sys.executable).parent
    out = subprocess.run([str(bin_dir / "lampq"), "--help"], capture_output=True, text=True, check=True)
    assert "layers" in out.stdout and "LampQ" in out.stdout
    out = subprocess.run(
        [sys.executable, "-c", "import lampq_jax; print(lampq_jax.__version__)"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == "0.1.0"
