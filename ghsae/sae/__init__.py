"""Sparse autoencoders: the architectures, their config, and their files (cfg.json + sae.safetensors).

The SAE is a shared model type, like the language model: fit trains it, report, export and the
public API load it, so it sits beside the other ground services rather than inside one stage.
"""

from ghsae.sae.architectures import BatchTopKSAE, JumpReLUSAE, ReLUSAE, TopKSAE, build_sae
from ghsae.sae.base import (
    AUXK_NORMALISATIONS,
    REGISTRY,
    RawLayer,
    SAEConfig,
    SAELensLayer,
    SAEOutput,
    SparseAutoencoder,
    dead_window,
    fvu,
    register,
)
from ghsae.sae.io import SAELoadError, load_sae, read_sae, save_sae
from ghsae.sae.latents import Latents

__all__ = [
    "AUXK_NORMALISATIONS",
    "REGISTRY",
    "RawLayer",
    "SAELensLayer",
    "BatchTopKSAE",
    "JumpReLUSAE",
    "Latents",
    "ReLUSAE",
    "SAEConfig",
    "SAELoadError",
    "SAEOutput",
    "SparseAutoencoder",
    "TopKSAE",
    "build_sae",
    "dead_window",
    "fvu",
    "load_sae",
    "read_sae",
    "register",
    "save_sae",
]
