"""Bit allocation: budgets and the HiGHS integer program (host-side numpy)."""

from lampq_jax.allocation.ilp import AllocationResult
from lampq_jax.allocation.ilp import Budget
from lampq_jax.allocation.ilp import allocate_bits
from lampq_jax.allocation.ilp import bops_budget
from lampq_jax.allocation.ilp import budget_usage
from lampq_jax.allocation.ilp import smallest_feasible_budget
