"""Layer discovery and type rules."""

from lampq_jax.layers.discovery import Layer, find_layers, layers_table, trace_layer_calls
from lampq_jax.layers.types import BUILTIN_RULES, LAYER_TYPES, layer_type
