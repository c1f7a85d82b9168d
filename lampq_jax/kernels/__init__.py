"""Pallas kernels for deployment: low-bit weight-only matmul and W8A8 int8 matmul.

Each kernel file holds the kernel (on Refs), a checked wrapper, a pure-jnp ``*_reference`` and
per-backend default block sizes; ``interpret=`` defaults to True on CPU.
"""

from lampq_jax.kernels.int8_matmul import default_block_sizes as int8_default_block_sizes
from lampq_jax.kernels.int8_matmul import int8_matmul
from lampq_jax.kernels.int8_matmul import int8_matmul_reference
from lampq_jax.kernels.int8_matmul import quantize_int8_symmetric
from lampq_jax.kernels.tiling import BlockSizes
from lampq_jax.kernels.weight_only_matmul import default_block_sizes as weight_only_default_block_sizes
from lampq_jax.kernels.weight_only_matmul import weight_only_matmul
from lampq_jax.kernels.weight_only_matmul import weight_only_matmul_reference
