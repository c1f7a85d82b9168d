"""Run an unchanged flax.linen model with quantized weights and activations (nn.intercept_methods)."""

from lampq_jax.apply.calibration import ActivationParams, calibrate_activations, check_images
from lampq_jax.apply.fake import QuantSpec, activation_interceptor, fake_quantize_params, quantized_apply
from lampq_jax.apply.model import QuantizedModel
from lampq_jax.apply.sites import find_attention_paths, site_interceptor
