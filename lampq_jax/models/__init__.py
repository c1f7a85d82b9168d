"""Scenic-layout ViT family and converters from other layouts."""

from lampq_jax.models.vit import VIT_SIZES, ViT, create_vit, decode_variant
