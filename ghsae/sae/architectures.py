"""The built-in SAE architectures, one file each (topk.py: topk and batchtopk, jumprelu.py, relu.py),
imported here so that each registers itself by name; build_sae builds any registered one."""

from __future__ import annotations

from ghsae.sae.base import REGISTRY, SAEConfig, SparseAutoencoder

# registration order is the order that error messages list the names in
from ghsae.sae.topk import BatchTopKSAE, TopKSAE

# isort: split
from ghsae.sae.jumprelu import JumpReLUSAE

# isort: split
from ghsae.sae.relu import ReLUSAE

__all__ = ["BatchTopKSAE", "JumpReLUSAE", "ReLUSAE", "TopKSAE", "build_sae"]


def build_sae(cfg: SAEConfig) -> SparseAutoencoder:
    return REGISTRY[cfg.architecture](cfg)
