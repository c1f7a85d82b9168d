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


__all__ = ["BlockSizes", "canonical_backend", "compiler_params", "fit_block", "resolve_interpret"]
