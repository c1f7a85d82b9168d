"""Scenic-layout ViT family and converters from other layouts."""

from lampq_jax.models.vit import VIT_SIZES, ViT, create_vit, decode_variant
from lampq_jax.models.convert import (
    build_model,
    from_augreg_npz,
    from_big_vision,
    from_huggingface,
    from_timm,
    resize_pos_embedding,
    unstack_scanned,
)
