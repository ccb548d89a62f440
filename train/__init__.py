"""The fit stage (`ghsae fit`, `ghsae export`): the trainer, checkpoints, provenance, the fit of one
group's SAE and the exports (SAELens, sparsify). The SAE architectures themselves are ghsae.sae.

`ghsae.train.load_sae(path)` loads a trained SAE folder (the same function as ghsae.load_sae);
`settings_mismatch(run, group)` is what other stages may ask of an SAE's training.
"""

from ghsae.sae import load_sae
from ghsae.train.provenance import settings_mismatch

__all__ = ["load_sae", "settings_mismatch"]
