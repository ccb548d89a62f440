"""The same TopK training step in EleutherAI sparsify and SAELens, for bench/fit.py.

Each peer gets ghsae's step shape: d, m, k, batch, float32, the same normalised rows already in
memory, forward + backward + the decoder-row housekeeping + one optimiser step, and (like ghsae
at its defaults early in a run) no dead latent, so AuxK is skipped where the library skips it.
Optimisers: sparsify's own trainer runs torch Adam with default settings (`adam`) and is timed
that way and with ghsae's fused Adam (`sparsify_fused_adam`, which isolates the SAE kernels);
SAELens runs torch Adam as its trainer does. A peer that is not installed is left out.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch


def _timed(step: Callable[[torch.Tensor], None], batches: Sequence[torch.Tensor], device: torch.device) -> float:
    step(batches[0])  # warm-up: kernels, allocator
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for x in batches:
        step(x)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return sum(len(x) for x in batches) / (time.perf_counter() - t0)


def sparsify_rate(batches, d: int, m: int, k: int, lr: float, device: torch.device, fused: bool) -> float | None:
    try:
        from sparsify import SparseCoder, SparseCoderConfig
    except ImportError:
        return None
    torch.manual_seed(0)
    sae = SparseCoder(d, SparseCoderConfig(num_latents=m, k=k), device=device, dtype=torch.float32)
    opt = torch.optim.Adam(sae.parameters(), lr=lr, fused=fused or None)
    since_fired = torch.zeros(m, dtype=torch.long, device=device)

    def step(x: torch.Tensor) -> None:
        dead = since_fired > 10_000_000  # sparsify's trainer: its default dead_feature_threshold
        out = sae(x, dead_mask=dead)
        loss = out.fvu + out.auxk_loss / 32
        opt.zero_grad(set_to_none=True)
        loss.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
        opt.step()
        sae.set_decoder_norm_to_unit_norm()
        with torch.no_grad():
            fired = torch.zeros(m, dtype=torch.bool, device=device)
            fired[out.latent_indices.flatten()] = True
            since_fired.add_(len(x)).masked_fill_(fired, 0)

    return _timed(step, batches, device)


def saelens_rate(batches, d: int, m: int, k: int, lr: float, device: torch.device) -> float | None:
    try:
        from sae_lens.saes.sae import TrainStepInput
        from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
    except ImportError:
        return None
    torch.manual_seed(0)
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d, d_sae=m, k=k, device=str(device), dtype="float32"))
    opt = torch.optim.Adam(sae.parameters(), lr=lr)
    dead = torch.zeros(m, dtype=torch.bool, device=device)

    def step(x: torch.Tensor) -> None:
        out = sae.training_forward_pass(
            TrainStepInput(sae_in=x, coefficients={}, dead_neuron_mask=dead, n_training_steps=0, is_logging_step=False)
        )
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
        opt.step()

    return _timed(step, batches, device)


def peer_rates(batches, d: int, m: int, k: int, lr: float, device: torch.device) -> dict[str, float]:
    """tokens/s of each installed peer on `batches` (normalised float32 rows on `device`)."""
    rates = {
        "sparsify_adam": sparsify_rate(batches, d, m, k, lr, device, fused=False),
        "sparsify_fused_adam": sparsify_rate(batches, d, m, k, lr, device, fused=True),
        "saelens_adam": saelens_rate(batches, d, m, k, lr, device),
    }
    return {name: round(rate, 1) for name, rate in rates.items() if rate is not None}
