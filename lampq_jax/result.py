"""The result of a quantization run: the quantized model, its bits, its report."""

from __future__ import annotations

import dataclasses
from typing import Any

from lampq_jax.apply.model import QuantizedModel


@dataclasses.dataclass(eq=False)
class QuantizationResult:
    """What `quantize` and `quantize_uniform` return.

    Attributes:
      quantized: the quantized model (`.apply` runs it).
      method: 'uniform', 'lampq' or a baseline's name.
      report: figures of the run (METHOD.md §9), JSON-serializable.
      timings: seconds per stage.
    """

    quantized: QuantizedModel
    method: str
    report: dict[str, Any] = dataclasses.field(default_factory=dict)
    timings: dict[str, float] = dataclasses.field(default_factory=dict)

    @property
    def bits(self) -> dict[str, tuple[int, int]]:
        """{layer path: (weight bits, activation bits)}."""
        return self.quantized.bits

    def apply(self, *args: Any, **kwargs: Any) -> Any:
        """Runs the quantized model on new inputs (jitted; quantization-time apply kwargs unless overridden)."""
        return self.quantized.apply(*args, **kwargs)
