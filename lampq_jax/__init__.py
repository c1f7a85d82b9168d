"""lampq_jax: LampQ layer-wise mixed-precision quantization of Vision Transformers in JAX."""

__version__ = "0.1.0"

from lampq_jax.layers import Layer, find_layers
from lampq_jax.models import create_vit
from lampq_jax.pipeline import quantize_uniform
from lampq_jax.result import QuantizationResult, load_result
from lampq_jax.config import LampQConfig
from lampq_jax.pipeline import metric_check, quantize
from lampq_jax.baselines import baseline_config, quantize_random
from lampq_jax.data.zero_shot import ZeroShotConfig
from lampq_jax.data.zero_shot import synthesize_calibration
from lampq_jax.apply.data_parallel import data_mesh
