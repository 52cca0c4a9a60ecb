"""XLA settings the package makes before JAX starts a backend (`import fednml_jax` applies them).

XLA:CPU hands convolutions to YNNPACK by default. On the project's 2-core Intel Xeon machine
(AVX-512; JAX 0.10.2) YNNPACK ran the weight gradients of SmallCNN's convolutions at 37-52 GFLOP/s
against a 310 GFLOP/s matrix-multiply rate, and XLA's own convolutions made a FedAvg round of the
CPU preset a third shorter (2.6 s against 3.9 s; docs/performance.md, "XLA's own convolutions
instead of YNNPACK's on CPU").
So convolutions are taken out of YNNPACK's share (`-individual_convolution`); its other fusions
stay. GPUs and TPUs ignore the flag.

The flag is added to `XLA_FLAGS` only when that variable does not already set
`xla_cpu_experimental_ynn_fusion_type`: a user's own choice stays (for instance
`XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=+individual_convolution` brings YNNPACK's
convolutions back, to compare on another CPU). It takes effect only if no JAX backend has started
before `fednml_jax` is imported (JAX reads `XLA_FLAGS` once, when it starts its first backend):
the command-line entry points import it first.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

YNN_FUSION_FLAG = "--xla_cpu_experimental_ynn_fusion_type"
CPU_CONVOLUTIONS_OUT_OF_YNNPACK = f"{YNN_FUSION_FLAG}=-individual_convolution"


def prefer_xla_cpu_convolutions(environ: MutableMapping[str, str] = os.environ) -> None:
  """Adds `CPU_CONVOLUTIONS_OUT_OF_YNNPACK` to `environ["XLA_FLAGS"]` unless it sets YNNPACK's
  fusion types already."""
  flags = environ.get("XLA_FLAGS", "")
  if YNN_FUSION_FLAG not in flags:
    environ["XLA_FLAGS"] = f"{flags} {CPU_CONVOLUTIONS_OUT_OF_YNNPACK}".strip()
