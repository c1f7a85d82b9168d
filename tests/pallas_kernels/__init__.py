"""Tests of the Pallas kernels; the folder is not named `kernels`, which would shadow the `kernels` package that transformers imports."""
