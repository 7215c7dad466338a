"""The model registry, installed as ``samreg_rt.models``."""
from .registry import REGISTRY, RegistryEntry, cache_dir, lookup, spec_for_arch

__all__ = ["REGISTRY", "RegistryEntry", "cache_dir", "lookup", "spec_for_arch"]
