"""A DINOv2-style backbone the built-in type rules do not know: invented module names, attention by hand.

Modules: `patch_embed` (Conv), `layer_i/{query,key,value,attn_out,fc1,fc2}` (Dense), LayerNorms; the
attention is written with `jnp.einsum`, so there is no nn.MultiHeadDotProductAttention to intercept.
It returns every token after the final norm, [batch, tokens, width], as a feature backbone does.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

RULES = (
    (r"layer_\d+/(query|key|value)$", "qkv"),
    (r"layer_\d+/attn_out$", "proj"),
    (r"layer_\d+/fc1$", "fc1"),
    (r"layer_\d+/fc2$", "fc2"),
    (r"^patch_embed$", "embed"),
)


class Block(nn.Module):
    width: int
    heads: int
    mlp: int

    @nn.compact
    def __call__(self, x):
        b, t, _ = x.shape
        d = self.width // self.heads
        h = nn.LayerNorm(name="norm1")(x)
        q, k, v = (nn.Dense(self.width, name=n)(h).reshape(b, t, self.heads, d) for n in ("query", "key", "value"))
        weights = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(d), axis=-1)
        attended = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, t, self.width)
        x = x + nn.Dense(self.width, name="attn_out")(attended)
        h = nn.gelu(nn.Dense(self.mlp, name="fc1")(nn.LayerNorm(name="norm2")(x)))
        return x + nn.Dense(self.width, name="fc2")(h)


class InventedBackbone(nn.Module):
    width: int = 16
    depth: int = 2
    heads: int = 2
    mlp: int = 32
    patch: int = 4

    @nn.compact
    def __call__(self, images):
        x = nn.Conv(self.width, (self.patch, self.patch), strides=self.patch, padding="VALID", name="patch_embed")(
            images
        )
        b, gh, gw, c = x.shape
        x = x.reshape(b, gh * gw, c)
        cls = self.param("cls_token", nn.initializers.normal(0.02), (1, 1, c))
        x = jnp.concatenate([jnp.tile(cls, [b, 1, 1]), x], axis=1)
        x = x + self.param("pos_embed", nn.initializers.normal(0.02), (1, x.shape[1], c))
        for i in range(self.depth):
            x = Block(self.width, self.heads, self.mlp, name=f"layer_{i}")(x)
        return nn.LayerNorm(name="norm")(x)


def build(**kwargs):
    """The `--model-fn` entry: `InventedBackbone(**kwargs)`."""
    return InventedBackbone(**kwargs)
