"""Block sizes and the tiling rules the Pallas matmul kernels share.

Both kernels (``weight_only_matmul``, ``int8_matmul``) tile the output ``[M, N]`` with a grid of
``(M / block_m, N / block_n)`` programs; each program loops over K in chunks of ``block_k``
inside the kernel, accumulating in registers. Looping over K *inside* the kernel (instead of a
third grid axis with an accumulator in scratch memory, as TPU-only kernels do) keeps one kernel
body valid for the Triton (GPU) lowering, whose grid programs can't share an accumulator, and
for Mosaic (TPU). The price: a program holds a ``[block_m, K]`` activation strip and a
``[K_packed, block_n]`` weight strip in on-chip memory, a few MiB at K = 4096.

Effective block sizes are fitted to each call (``fit_block``): a block never exceeds the
(padded) dimension, is halved while that avoids padding, and the wrapper zero-pads what is left.
"""

from __future__ import annotations

import dataclasses

import jax


def _is_power_of_two(v: int) -> bool:
    return v > 0 and (v & (v - 1)) == 0


@dataclasses.dataclass(frozen=True, kw_only=True)
class BlockSizes:
    """Tile sizes of a matmul kernel: output tiles ``[block_m, block_n]``, K chunks ``block_k``.

    All three must be powers of two (the Triton lowering needs power-of-two tensor sizes), and
    ``block_k >= 8`` (one packing group of the widest layout). They are upper bounds: the wrapper
    shrinks a block that exceeds its dimension, see ``fit_block``.
    """

    block_m: int
    block_n: int
    block_k: int

    def __post_init__(self):
        for name in ("block_m", "block_n", "block_k"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not _is_power_of_two(v):
                raise ValueError(f"{name} must be a positive power of two, got {v!r}")
        if self.block_k < 8:
            raise ValueError(f"block_k must be >= 8, got {self.block_k}")


def canonical_backend(backend: str | None = None) -> str:
    """``"tpu"``, ``"gpu"`` or ``"cpu"`` for a backend/platform name (default: JAX's backend)."""
    name = (backend or jax.default_backend()).lower()
    if name in ("gpu", "cuda", "rocm"):
        return "gpu"
    if name in ("tpu", "cpu"):
        return name
    raise ValueError(f"backend must be 'tpu', 'gpu' or 'cpu', got {backend!r}")


# Default upper bounds on the tiles, per kernel and backend.
# - TPU: lane-dense 256-wide output tiles; 512-code K chunks keep 4-bit dots 256 deep.
# - GPU (Triton): tiles sized for registers / shared memory (M shrinks to 16 for decode).
# - CPU runs the kernels in interpret mode: big tiles mean few grid steps.
_TPU_AND_CPU = BlockSizes(block_m=128, block_n=256, block_k=512)
DEFAULT_BLOCK_SIZES = {
    "int8": {"tpu": _TPU_AND_CPU, "gpu": BlockSizes(block_m=64, block_n=128, block_k=128), "cpu": _TPU_AND_CPU},
    "weight_only": {"tpu": _TPU_AND_CPU, "gpu": BlockSizes(block_m=64, block_n=128, block_k=256), "cpu": _TPU_AND_CPU},
}


def default_block_sizes(kernel: str, backend: str | None = None) -> BlockSizes:
    """Default ``BlockSizes`` of ``kernel`` (``"int8"``, ``"weight_only"``) on ``backend`` (default: JAX's)."""
    return DEFAULT_BLOCK_SIZES[kernel][canonical_backend(backend)]


def resolve_block_sizes(kernel: str, block_sizes: BlockSizes | None, backend: str) -> BlockSizes:
    """``block_sizes``, or ``kernel``'s default on ``backend`` when it is None.

    Raises:
      TypeError: ``block_sizes`` is neither None nor a ``BlockSizes``.
    """
    if block_sizes is None:
        return default_block_sizes(kernel, backend)
    if not isinstance(block_sizes, BlockSizes):
        raise TypeError(f"block_sizes must be a BlockSizes, got {type(block_sizes).__name__}")
    return block_sizes


def fit_rows(m: int, block_m: int, minimum: int) -> tuple[int, int]:
    """(block, padded M) for the M axis: the smallest power of two ≥ M, at least ``min(block_m, minimum)``
    and at most ``block_m``."""
    block = min(block_m, max(min(block_m, minimum), next_power_of_two(m)))
    return block, round_up(m, block)


def resolve_interpret(interpret):
    """``interpret=None`` means: interpret on CPU (no Pallas compiler there), compile elsewhere."""
    if interpret is None:
        return jax.default_backend() == "cpu"
    return interpret


def compiler_params(backend: str, num_parallel_axes: int = 2):
    """Pallas compiler parameters that pick the lowering for ``backend``.

    ``"gpu"``: Triton (``num_warps=4``), which the kernels here are written for; without it
    recent JAX would pick Mosaic GPU, which lowers a different kernel style. ``"tpu"``: Mosaic
    with every grid axis ``"parallel"`` (the kernels loop over K inside). ``"cpu"``: None.
    Looks up the class names of JAX >= 0.7 first, then the older ``*CompilerParams`` names.
    """
    backend = canonical_backend(backend)
    if backend == "gpu":
        from jax.experimental.pallas import triton as pltriton  # pylint: disable=g-import-not-at-top

        cls = getattr(pltriton, "CompilerParams", None) or getattr(pltriton, "TritonCompilerParams")
        return cls(num_warps=4, num_stages=2)
    if backend == "tpu":
        from jax.experimental.pallas import tpu as pltpu  # pylint: disable=g-import-not-at-top

        cls = getattr(pltpu, "CompilerParams", None) or getattr(pltpu, "TPUCompilerParams")
        return cls(dimension_semantics=("parallel",) * num_parallel_axes)
    return None


def next_power_of_two(v: int) -> int:
    return 1 << max(int(v) - 1, 0).bit_length()


def round_up(v: int, multiple: int) -> int:
    return -(-int(v) // multiple) * multiple


def fit_block(dim: int, block: int, minimum: int) -> tuple[int, int]:
    """Effective block for a dimension, and the dimension padded to a multiple of it.

    Starts from ``min(block, max(minimum, next_power_of_two(dim)))`` and halves it (not below
    ``min(block, minimum)``) while it does not divide ``dim``; if none divides, keeps the first
    and pads. E.g. ``fit_block(768, 512, 128) == (256, 768)``; ``fit_block(70, 128, 128) ==
    (128, 128)``.

    Returns:
      ``(block, padded_dim)``.
    """
    floor = min(block, minimum)
    first = min(block, max(floor, next_power_of_two(dim)))
    b = first
    while b > floor and dim % b:
        b //= 2
    if dim % b:
        b = first
    return b, round_up(dim, b)


__all__ = [
    "BlockSizes",
    "canonical_backend",
    "compiler_params",
    "default_block_sizes",
    "fit_block",
    "fit_rows",
    "resolve_block_sizes",
    "resolve_interpret",
]
