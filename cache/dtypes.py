"""Storage dtypes of the activation store: one object per dtype says how activations are stored.

A dtype names its logical torch type, the physical numpy/torch types zarr and pinned memory hold
(bfloat16 has no numpy type: its bits are stored as uint16), its largest finite value (the
harvest's guard refuses what does not fit), and how activations are encoded and decoded. A new
storage dtype is one more entry in DTYPES (and its name in ghsae.config.STORAGE_DTYPES, tested).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class StorageDType:
    name: str
    logical: torch.dtype
    """What the values are: the dtype they are rounded to."""
    physical: np.dtype
    """The numpy dtype of the stored arrays (zarr's dtype)."""
    physical_torch: torch.dtype
    """A torch dtype of the same bits (pinned staging buffers hold these)."""
    max_finite: float
    """Largest finite magnitude the dtype holds."""
    exponent_mask: int
    """The exponent bits: all ones means inf or NaN."""

    def encode(self, acts: torch.Tensor) -> np.ndarray:
        """Float activations -> the stored physical array."""
        rounded = acts.to(self.logical)
        if self.logical == self.physical_torch:
            return rounded.cpu().numpy()
        return rounded.view(self.physical_torch).cpu().numpy().view(self.physical)

    def decode(self, stored: np.ndarray) -> np.ndarray:
        """Stored physical array -> float32."""
        if self.logical == torch.bfloat16:  # the high half of a float32
            return (stored.astype(np.uint32) << 16).view(np.float32)
        return stored.astype(np.float32)

    def widen(self, raw: torch.Tensor) -> torch.Tensor:
        """A tensor of stored bits (physical_torch or the numpy physical dtype's torch twin) -> float32."""
        if raw.dtype != self.logical:
            raw = raw.view(self.logical)
        return raw.float()

    def as_physical_torch(self, stored: np.ndarray) -> torch.Tensor:
        """Stored physical array as a torch tensor of physical_torch (no copy)."""
        return torch.from_numpy(np.ascontiguousarray(stored).view(_numpy_twin(self.physical_torch)))

    def count_nonfinite(self, stored: np.ndarray) -> int:
        """inf/NaN values among stored activations, read from their bits (integer work, no widening)."""
        mask = np.uint16(self.exponent_mask)
        return int(np.count_nonzero((stored.view(np.uint16) & mask) == mask))


def _numpy_twin(dtype: torch.dtype) -> type:
    return {torch.float16: np.float16, torch.int16: np.int16}[dtype]


DTYPES = {
    d.name: d
    for d in (
        StorageDType("float16", torch.float16, np.dtype(np.float16), torch.float16, 65504.0, 0x7C00),
        StorageDType(
            "bfloat16", torch.bfloat16, np.dtype(np.uint16), torch.int16, float(torch.finfo(torch.bfloat16).max), 0x7F80
        ),
    )
}


def storage_dtype(name: str) -> StorageDType:
    """The storage dtype called `name` (config validation has refused any other)."""
    return DTYPES[name]
