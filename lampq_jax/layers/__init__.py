"""Layer discovery and type rules."""

from lampq_jax.layers.discovery import Layer, find_layers, layers_table, trace_layer_calls
from lampq_jax.layers.types import BUILTIN_RULES, LAYER_TYPES, TypeRule, check_rules, layer_type
from lampq_jax.layers.coverage import NO_ATTENTION_LINE, coverage_lines, quantization_coverage
