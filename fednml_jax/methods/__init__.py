"""Federated methods. Each is one module; `METHODS` maps `config.method` names to classes."""

from fednml_jax.methods.base import FederatedSetup, Method, RoundContext
from fednml_jax.methods.fedavg import FedAvg
from fednml_jax.methods.feddc import FedDC
from fednml_jax.methods.fedlsm import FedLSM
from fednml_jax.methods.fedmlp import FedMLP
from fednml_jax.methods.fednml import FedNML
from fednml_jax.methods.fednoro import FedNoRo
from fednml_jax.methods.fedprox import FedProx
from fednml_jax.methods.maskedoptim import FedELC, MaskedOptim

METHODS = {cls.name: cls for cls in (FedAvg, FedProx, FedNML, FedNoRo, FedMLP, FedLSM, FedDC,
                                     MaskedOptim, FedELC)}


def method_config_defaults() -> dict:
  """{method name: its ConfigDict of constants} for the methods that have constants."""
  out = {}
  for name, cls in METHODS.items():
    defaults = cls.config_defaults()
    if defaults is not None:
      out[name] = defaults
  return out


__all__ = ["METHODS", "FederatedSetup", "Method", "RoundContext", "method_config_defaults"]
