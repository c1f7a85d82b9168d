"""Deployment of a quantization result: packed low-bit tensors, integer inference on the Pallas kernels, Qwix rules."""

from lampq_jax.deploy.export import export_nbytes, export_result, load_export, save_export
from lampq_jax.deploy.integer import IntegerModel, integer_apply
from lampq_jax.deploy.qwix_rules import qwix_params, qwix_rules
