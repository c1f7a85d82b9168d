"""Quantizer math on arrays: uniform (min-max and clipping search), STE, GPTQ, packed tensors. No Flax."""

from lampq_jax.quant.clipping import DEFAULT_CLIP_RATIOS
from lampq_jax.quant.clipping import quant_errors
from lampq_jax.quant.clipping import search_clipping_levels
from lampq_jax.quant.clipping import search_clipping_params
from lampq_jax.quant.uniform import MAX_BITS
from lampq_jax.quant.uniform import MIN_BITS
from lampq_jax.quant.uniform import UniformParams
from lampq_jax.quant.uniform import as_compute
from lampq_jax.quant.uniform import check_bits
from lampq_jax.quant.uniform import dequantize
from lampq_jax.quant.uniform import fake_quant
from lampq_jax.quant.uniform import fake_quant_ste
from lampq_jax.quant.uniform import minmax_params
from lampq_jax.quant.uniform import num_levels
from lampq_jax.quant.uniform import quantize
from lampq_jax.quant.uniform import quantize_levels
from lampq_jax.quant.uniform import weight_reduce_axes
