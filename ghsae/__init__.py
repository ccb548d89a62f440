"""ghsae: Group-SAEs, one sparse autoencoder per group of similar contiguous layers."""

__version__ = "0.1.0"
