"""One batch's latents of one SAE at one layer, held in whichever form is cheapest to read.

The evaluation reads a batch's latents four ways: decoded, counted per latent (L0, dead latents),
and as a few sampled columns (top examples, dashboards). A TopK SAE at m = 9,216 and k = 128 has
72 zeros for every active latent, so building the dense [n, m] matrix and then scanning it for its
non-zeros was about a sixth of `ghsae report`'s time (py-spy, the default run). A TopK SAE hands
back its (values, indices) [n, k] instead; the other architectures (whose activation is a dense
threshold) hand back the dense matrix. Both answer the same questions with the same numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Latents:
    """Either `dense` [n, m], or `values` and `indices` [n, k] (a row's k latents; a value may be 0)."""

    n_latents: int
    dense_z: torch.Tensor | None = None
    values: torch.Tensor | None = None
    indices: torch.Tensor | None = None

    @classmethod
    def from_dense(cls, z: torch.Tensor) -> Latents:
        return cls(z.shape[1], dense_z=z)

    @classmethod
    def from_topk(cls, values: torch.Tensor, indices: torch.Tensor, n_latents: int) -> Latents:
        return cls(n_latents, values=values, indices=indices)

    @property
    def n_rows(self) -> int:
        return self.dense_z.shape[0] if self.dense_z is not None else self._sparse()[0].shape[0]

    def _sparse(self) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.values is not None and self.indices is not None
        return self.values, self.indices

    def dense(self) -> torch.Tensor:
        """[n, m], built on request for sparse latents."""
        if self.dense_z is not None:
            return self.dense_z
        values, indices = self._sparse()
        return values.new_zeros(values.shape[0], self.n_latents).scatter(-1, indices, values)

    def fired_counts(self) -> torch.Tensor:
        """Per latent, the rows where it is non-zero: int64 [m], on the CPU."""
        if self.dense_z is not None:
            return torch.count_nonzero(self.dense_z, dim=0).to(torch.int64).cpu()
        values, indices = self._sparse()
        return torch.bincount(indices[values != 0], minlength=self.n_latents).cpu()

    def columns(self, ids: torch.Tensor) -> torch.Tensor:
        """The latents `ids` [s] of every row: [n, s], zeros where a latent is not active."""
        if self.dense_z is not None:
            return self.dense_z[:, ids.to(self.dense_z.device)]
        values, indices = self._sparse()
        ids = ids.to(indices.device)
        slot = torch.full((self.n_latents,), -1, dtype=torch.long, device=indices.device)
        slot[ids] = torch.arange(ids.numel(), device=indices.device)
        where = slot[indices]  # [n, k]: column of each entry among ids, -1 for the others
        hit = where >= 0
        out = values.new_zeros(values.shape[0], ids.numel())
        rows = torch.arange(values.shape[0], device=indices.device)[:, None].expand_as(where)
        out[rows[hit], where[hit]] = values[hit]
        return out

    def decode_rows(self, W_dec: torch.Tensor) -> torch.Tensor:
        """latents @ W_dec [n, d] (no bias): for sparse latents, each row's k decoder rows weighted and summed."""
        if self.dense_z is not None:
            return self.dense_z @ W_dec
        values, indices = self._sparse()
        return torch.nn.functional.embedding_bag(indices, W_dec.to(values.dtype), mode="sum", per_sample_weights=values)
