"""One batch's latents of one SAE at one layer, held in whichever form is cheapest to read.

The evaluation reads a batch's latents four ways: decoded, counted per latent (L0, dead latents),
and as a few sampled columns (top examples, dashboards). A TopK SAE at m = 9,216 and k = 128 has
72 zeros for every active latent, so building the dense [n, m] matrix and then scanning it for its
non-zeros was about a sixth of `ghsae report`'s time (py-spy, the default run). A TopK SAE hands
back its active latents as SparseCodes (sparse.py, the training step's form) instead; the other architectures (whose activation is a dense
threshold) hand back the dense matrix. Both answer the same questions with the same numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ghsae.sae.sparse import SparseCodes


@dataclass(frozen=True)
class Latents:
    """Either `dense_z` [n, m], or `codes`: the active latents as sparse.py's SparseCodes (the form
    the training step already uses; a TopK row holds k entries, some of which may be 0)."""

    n_latents: int
    dense_z: torch.Tensor | None = None
    codes: SparseCodes | None = None

    @classmethod
    def from_dense(cls, z: torch.Tensor) -> Latents:
        return cls(z.shape[1], dense_z=z)

    @classmethod
    def from_codes(cls, codes: SparseCodes) -> Latents:
        return cls(codes.n_latents, codes=codes)

    def _codes(self) -> SparseCodes:
        assert self.codes is not None
        return self.codes

    @property
    def n_rows(self) -> int:
        return self.dense_z.shape[0] if self.dense_z is not None else self._codes().n_rows

    def dense(self) -> torch.Tensor:
        """[n, m], built on request for sparse latents."""
        return self.dense_z if self.dense_z is not None else self._codes().to_dense()

    def fired_counts(self) -> torch.Tensor:
        """Per latent, the rows where it is non-zero: int64 [m], on the CPU."""
        if self.dense_z is not None:
            return torch.count_nonzero(self.dense_z, dim=0).to(torch.int64).cpu()
        codes = self._codes()
        return torch.bincount(codes.indices[codes.values != 0], minlength=self.n_latents).cpu()

    def columns(self, ids: torch.Tensor) -> torch.Tensor:
        """The latents `ids` [s] of every row: [n, s], zeros where a latent is not active."""
        if self.dense_z is not None:
            return self.dense_z[:, ids.to(self.dense_z.device)]
        codes = self._codes()
        ids = ids.to(codes.indices.device)
        slot = torch.full((self.n_latents,), -1, dtype=torch.long, device=ids.device)
        slot[ids] = torch.arange(ids.numel(), device=ids.device)
        where = slot[codes.indices]  # [nnz]: column of each entry among ids, -1 for the others
        hit = where >= 0
        out = codes.values.new_zeros(codes.n_rows, ids.numel())
        out[codes.rows()[hit], where[hit]] = codes.values[hit]
        return out

    def decode_rows(self, W_dec: torch.Tensor) -> torch.Tensor:
        """latents @ W_dec [n, d] (no bias): for sparse latents the CSR product, the training step's decode."""
        if self.dense_z is not None:
            return self.dense_z @ W_dec
        codes = self._codes()
        return codes.csr() @ W_dec.to(codes.values.dtype)
