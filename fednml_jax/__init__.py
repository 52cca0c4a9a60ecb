"""FedNML and its baselines in JAX/Flax (README.md).

Importing the package sets XLA's CPU convolution flag before JAX starts a backend
(`fednml_jax.xla_flags`)."""

from fednml_jax import xla_flags as _xla_flags

_xla_flags.prefer_xla_cpu_convolutions()
