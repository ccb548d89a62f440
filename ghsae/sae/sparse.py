"""Sparse kernels for the TopK family's training step: latents as (values, indices), never [n, m].

A TopK step needs one dense product, the encoder's pre-activations (2·d·m flops a token), to
choose each token's latents. Everything after the choice touches only the n·k active entries:

    decode      recon[i]   = sum_j v_ij W_dec[idx_ij]          gather k decoder rows per token
    d values    g_v[i, j]  = <g_recon[i], W_dec[idx_ij]>       the same pattern, sampled dot products
    d W_dec     rows idx   += v_ij g_recon[i]                  entries grouped by latent
    d W_enc     cols idx   += g_pre_ij (x_i - b_dec)           the same grouping, other values
    d b_enc, d b_dec       one index_add over the entries, then a d×m matrix-vector product

so the decoder and both weight gradients cost n·k·d instead of n·m·d (m/k = 72 at x16, k=128).
The kernels are public torch.sparse CSR products (`S @ W`, `S^T @ Y`, `sampled_addmm`), which
exist on CPU and CUDA alike, and nothing here reads a value back to the host.

Measured on the 2-core CPU this was developed on (n=4096, d=576, m=9216, k=128; bench/fit.py's
shape): the row gather as a CSR product or as `embedding_bag` costs about the same (90-165 ms
against 105-115 ms under a shared load) and index_select + bmm about 20x more (it builds the
[n, k, d] gathered rows); `S^T @ Y` as a CSR product after one sort of the entries by latent,
shared by both weight gradients, beats letting autograd differentiate `embedding_bag` (which
sorts once per gradient) and a chunked index_add of outer products (which builds them).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch

# torch announces once per process that CSR support is "beta"; the products used here are stable
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")


@dataclass(frozen=True)
class SparseCodes:
    """Active latents of a batch in CSR layout: row i owns entries crow[i]:crow[i+1].

    TopK rows all hold k entries; BatchTopK rows hold as many as the batch gave them. `values`
    carries the autograd graph back to the encoder; `indices` and `crow` are plain long tensors.
    """

    values: torch.Tensor  # [nnz]
    indices: torch.Tensor  # [nnz] latent ids
    crow: torch.Tensor  # [n + 1]
    n_latents: int
    _by_latent: list = field(default_factory=list, repr=False, compare=False)  # cached transposed pattern

    @classmethod
    def from_topk(cls, values: torch.Tensor, indices: torch.Tensor, n_latents: int) -> SparseCodes:
        """[n, k] values and indices (one row per token) as CSR."""
        n, k = indices.shape
        crow = torch.arange(n + 1, device=indices.device) * k
        return cls(values.reshape(-1), indices.reshape(-1), crow, n_latents)

    @property
    def n_rows(self) -> int:
        return self.crow.numel() - 1

    def with_values(self, values: torch.Tensor) -> SparseCodes:
        """The same pattern with other values (shares the cached transposed pattern)."""
        return SparseCodes(values, self.indices, self.crow, self.n_latents, self._by_latent)

    def rows(self) -> torch.Tensor:
        """Row of each entry, [nnz]."""
        entries = torch.arange(self.indices.numel(), device=self.crow.device)
        return torch.searchsorted(self.crow[1:], entries, right=True)  # rows before the entry's end

    def csr(self, values: torch.Tensor | None = None) -> torch.Tensor:
        """The [n, m] sparse CSR matrix (values default to this batch's, detached)."""
        vals = (self.values if values is None else values).detach()
        return torch.sparse_csr_tensor(
            self.crow, self.indices, vals, (self.n_rows, self.n_latents), check_invariants=False
        )

    def by_latent(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(order, crow_t, rows_t): entries sorted by latent, as the CSR of the transpose [m, n].

        Built once per batch and shared by the decoder's and the encoder's weight gradients.
        """
        if not self._by_latent:
            sorted_ids, order = torch.sort(self.indices, stable=True)  # stable: a deterministic sum order
            bounds = torch.arange(self.n_latents + 1, device=self.indices.device)
            crow_t = torch.searchsorted(sorted_ids, bounds)  # no host sync, unlike bincount on CUDA
            self._by_latent.extend([order, crow_t, self.rows()[order]])
        order, crow_t, rows_t = self._by_latent
        return order, crow_t, rows_t

    def to_dense(self) -> torch.Tensor:
        """The [n, m] latents (for callers that ask for them; the training step never does)."""
        out = self.values.new_zeros(self.n_rows, self.n_latents)
        return out.index_put((self.rows(), self.indices), self.values, accumulate=True)

    def fired(self) -> torch.Tensor:
        """[m] bool: latents with a positive activation somewhere in the batch."""
        hits = torch.zeros(self.n_latents, device=self.values.device, dtype=torch.int32)
        return hits.index_add_(0, self.indices, (self.values.detach() > 0).int()) > 0

    def l0(self) -> torch.Tensor:
        """Mean number of positive latents per row."""
        return (self.values.detach() > 0).sum() / max(self.n_rows, 1)


def gather_rows(codes: SparseCodes, weight: torch.Tensor, values: torch.Tensor | None = None) -> torch.Tensor:
    """sum_j v_ij weight[idx_ij] per row: [n, d] (weight [m, d]); no autograd."""
    return codes.csr(values) @ weight


def scatter_rows(codes: SparseCodes, values: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """S^T @ rows: out[j] = sum over entries (i, j) of v_ij rows[i], [m, d]; no autograd."""
    order, crow_t, rows_t = codes.by_latent()
    s_t = torch.sparse_csr_tensor(
        crow_t, rows_t, values.detach()[order], (codes.n_latents, codes.n_rows), check_invariants=False
    )
    return s_t @ rows


def sampled_dots(codes: SparseCodes, left: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """<left[i], weight[idx_ij]> for every entry, [nnz] (left [n, d], weight [m, d]); no autograd."""
    pattern = codes.csr(torch.zeros_like(codes.values))
    return torch.sparse.sampled_addmm(pattern, left, weight.t(), beta=0.0).values()


class _DecodeActive(torch.autograd.Function):
    """recon = S @ W_dec with gradients for the active values and the decoder rows only."""

    @staticmethod
    def forward(ctx, values, W_dec, codes):
        ctx.codes = codes
        ctx.save_for_backward(values, W_dec)
        return gather_rows(codes, W_dec, values)

    @staticmethod
    def backward(ctx, grad):
        values, W_dec = ctx.saved_tensors
        codes: SparseCodes = ctx.codes
        grad = grad.contiguous()
        g_values = sampled_dots(codes, grad, W_dec) if ctx.needs_input_grad[0] else None
        g_dec = scatter_rows(codes, values, grad) if ctx.needs_input_grad[1] else None
        return g_values, g_dec, None


class _EncodeActive(torch.autograd.Function):
    """The active pre-activations (x - b_dec) @ W_enc[:, idx] + b_enc[idx], computed densely once
    for the selection and passed in; the backward reaches W_enc, b_enc, b_dec (and x) through the
    active entries only."""

    @staticmethod
    def forward(ctx, active_pre, x, W_enc, b_enc, b_dec, xc, codes):
        ctx.codes = codes
        ctx.save_for_backward(xc, W_enc)
        return active_pre

    @staticmethod
    def backward(ctx, grad):
        xc, W_enc = ctx.saved_tensors
        codes: SparseCodes = ctx.codes
        need_x, need_w, need_be, need_bd = ctx.needs_input_grad[1:5]
        g_x = g_w = g_be = g_bd = None
        if need_w:
            g_w = scatter_rows(codes, grad, xc).t()  # [m, d] -> the parameter's [d, m]
        if need_be or need_bd:
            per_latent = torch.zeros(codes.n_latents, device=grad.device, dtype=grad.dtype)
            per_latent.index_add_(0, codes.indices, grad)
            g_be = per_latent if need_be else None
            g_bd = -(W_enc @ per_latent) if need_bd else None  # pre depends on b_dec through -b_dec @ W_enc
        if need_x:
            g_x = gather_rows(codes, W_enc.t().contiguous(), grad)
        return None, g_x, g_w, g_be, g_bd, None, None


def encode_active(
    active_pre: torch.Tensor,
    codes: SparseCodes,
    x: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    b_dec: torch.Tensor,
    xc: torch.Tensor,
) -> torch.Tensor:
    """The pre-activations at the codes' entries [nnz], differentiable w.r.t. the encoder.

    active_pre holds their values, read out of the dense product already computed (without a
    graph) for the selection; xc = x - b_dec.
    """
    return _EncodeActive.apply(active_pre.detach(), x, W_enc, b_enc, b_dec, xc.detach(), codes)


def decode_active(codes: SparseCodes, W_dec: torch.Tensor) -> torch.Tensor:
    """S @ W_dec [n, d] (no bias), differentiable w.r.t. the codes' values and W_dec."""
    return _DecodeActive.apply(codes.values, W_dec, codes)
