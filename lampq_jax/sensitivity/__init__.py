"""Per-sample Fisher traces and the type-aware metric."""

from lampq_jax.sensitivity.fisher import FisherTraces, fisher_traces, sample_targets
