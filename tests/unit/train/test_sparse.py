"""The sparse TopK step against dense autograd, AuxK against a hand computation, and revival."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from test_sae import planted_data

from ghsae.cache.loader import LoaderBatch
from ghsae.config import FitConfig
from ghsae.sae import SAEConfig, build_sae, dead_window
from ghsae.sae.sparse import SparseCodes
from ghsae.train.trainer import Trainer


def dense_reference_loss(sae, x: torch.Tensor) -> torch.Tensor:
    """The step's loss written densely ([n, m] latents, n·m·d products), differentiated by autograd."""
    cfg = sae.cfg
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    if cfg.architecture == "topk":
        vals, idx = pre.topk(cfg.k, dim=-1)
        z = torch.zeros_like(pre).scatter(-1, idx, vals.relu())
    else:
        flat = pre.flatten()
        vals, idx = flat.topk(cfg.k * x.shape[0])
        z = torch.zeros_like(flat).scatter(-1, idx, vals.relu()).view_as(pre)
    recon = z @ sae.W_dec + sae.b_dec
    var = (x - x.mean(0)).pow(2).sum()
    err = x - recon
    loss = err.pow(2).sum() / var
    dead = sae.tokens_since_fired >= cfg.dead_tokens
    n_dead = int(dead.sum())
    if n_dead:
        k_aux = cfg.effective_aux_k
        masked = torch.where(dead, pre, torch.full_like(pre, -math.inf))
        avals, aidx = masked.topk(min(k_aux, n_dead), dim=-1)
        z_aux = torch.zeros_like(pre).scatter(-1, aidx, avals.relu())
        e_hat = z_aux @ sae.W_dec
        sq = (e_hat - err.detach()).pow(2).sum()
        if cfg.auxk_normalisation == "total-variance":
            aux = min(n_dead / k_aux, 1.0) * sq / var
        else:
            e = err.detach()
            aux = sq / (e - e.mean(0)).pow(2).sum()
        loss = loss + cfg.aux_coef * aux
    return loss


def random_sae(arch: str, n_dead: int, normalisation: str = "total-variance", seed: int = 0):
    torch.manual_seed(seed)
    sae = build_sae(SAEConfig(arch, 16, 96, [0], k=6, dead_tokens=100, auxk_normalisation=normalisation))
    with torch.no_grad():  # move off the symmetric initialisation so every parameter matters
        for p in sae.parameters():
            p.add_(0.1 * torch.randn_like(p))
    sae.tokens_since_fired[torch.randperm(96)[:n_dead]] = 1000
    return sae


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
@pytest.mark.parametrize(
    ("n_dead", "normalisation"),
    [(0, "total-variance"), (5, "total-variance"), (40, "total-variance"), (40, "error-variance")],
)
def test_the_sparse_step_equals_dense_autograd(arch, n_dead, normalisation):
    sae = random_sae(arch, n_dead, normalisation)
    reference = copy.deepcopy(sae)
    x = torch.randn(64, 16) * 2 + 0.5
    sae.train()
    out = sae(x)
    assert out.codes is not None and out.dense is None, "training must take the sparse path"
    out.loss.backward()
    expected = dense_reference_loss(reference, x)
    expected.backward()
    assert (out.losses["auxk"] > 0) == (n_dead > 0)
    torch.testing.assert_close(out.loss, expected, rtol=1e-5, atol=0)
    for name, p in sae.named_parameters():
        ref = dict(reference.named_parameters())[name].grad
        assert p.grad is not None and ref is not None and ref.abs().max() > 0, name
        rel = float((p.grad - ref).norm() / ref.norm())
        assert rel < 1e-5, f"{arch} d{name}: relative error {rel:.2e}"


def test_sparse_codes_round_trip_to_dense_and_count_fired_latents():
    values = torch.tensor([[0.5, 0.0], [2.0, 1.0]])
    idx = torch.tensor([[3, 1], [0, 3]])
    codes = SparseCodes.from_topk(values, idx, 5)
    dense = torch.zeros(2, 5)
    dense[0, 3], dense[1, 0], dense[1, 3] = 0.5, 2.0, 1.0
    torch.testing.assert_close(codes.to_dense(), dense)
    assert codes.fired().tolist() == [True, False, False, True, False]  # a zero value is not a firing
    assert float(codes.l0()) == 1.5


def test_auxk_matches_a_hand_computation():
    """d=4, m=6, k=1: two dead latents, k_aux = 2; every number below is worked out with numpy."""
    d, m = 4, 6
    sae = build_sae(SAEConfig("topk", d, m, [0], k=1, dead_tokens=10))
    rng = np.random.default_rng(3)
    W_enc, W_dec = rng.normal(size=(d, m)), rng.normal(size=(m, d))
    W_dec /= np.linalg.norm(W_dec, axis=1, keepdims=True)
    b_enc, b_dec = rng.normal(size=m) * 0.1, rng.normal(size=d) * 0.1
    x = rng.normal(size=(3, d))
    with torch.no_grad():
        for p, v in ((sae.W_enc, W_enc), (sae.W_dec, W_dec), (sae.b_enc, b_enc), (sae.b_dec, b_dec)):
            p.copy_(torch.tensor(v))
    dead = [1, 4]
    sae.tokens_since_fired[dead] = 50
    out = sae(torch.tensor(x, dtype=torch.float32))

    pre = (x - b_dec) @ W_enc + b_enc
    recon = np.zeros_like(x)
    for i in range(3):
        j = int(np.argmax(pre[i]))
        recon[i] = max(pre[i, j], 0) * W_dec[j]
    recon += b_dec
    err = x - recon
    total_var = ((x - x.mean(0)) ** 2).sum()
    err_hat = np.zeros_like(x)
    for i in range(3):  # k_aux = d // 2 = 2 = both dead latents
        for j in dead:
            err_hat[i] += max(pre[i, j], 0) * W_dec[j]
    scale = min(len(dead) / (d // 2), 1.0)
    expected = (1 / 32) * scale * ((err - err_hat) ** 2).sum() / total_var
    assert float(out.losses["auxk"].detach()) == pytest.approx(expected, rel=1e-5)
    assert float(out.losses["fvu"].detach()) == pytest.approx((err**2).sum() / total_var, rel=1e-5)

    sae.tokens_since_fired.zero_()
    sae.tokens_since_fired[1] = 50  # one dead latent: k_aux = min(2, 1), scale 1/2
    out = sae(torch.tensor(x, dtype=torch.float32))
    err_hat = np.maximum(pre[:, 1:2], 0) * W_dec[1]
    assert float(out.losses["auxk"].detach()) == pytest.approx(
        (1 / 32) * 0.5 * ((err - err_hat) ** 2).sum() / total_var, rel=1e-5
    )


def test_the_auto_dead_window_scales_with_the_run():
    assert dead_window(0, 97_000) == 9_700
    assert dead_window(0, 10**10) == 10_000_000  # capped at the reference's window
    assert dead_window(5_000, 97_000) == 5_000  # an explicit value wins


class _DeviceOnly:
    device = torch.device("cpu")


def _train_with_dead_latents(tmp_path, aux_coef: float, epochs: int = 1) -> list[float]:
    """A planted dictionary of 64 atoms and an SAE of 64 latents, half of them dead at the start:
    their encoder columns are shrunk so they never reach a top-k, though their pre-activations stay
    partly positive (AuxK's signal). Every latent is needed, so only revival brings the dead % down."""
    atoms, x = planted_data(n=12288)
    torch.manual_seed(0)
    cfg = FitConfig(lr=3e-3, dead_tokens=1024, aux_coef=aux_coef, grad_clip=0.0, decay="none")
    sae = build_sae(SAEConfig("topk", 32, 64, [0], k=3, dead_tokens=1024, aux_coef=aux_coef))
    with torch.no_grad():
        sae.b_dec.copy_(x.mean(0))
        sae.W_enc[:, 32:] *= 0.1
    sae.tokens_since_fired[32:] = 1024  # dead from the first step
    trainer = Trainer(cfg, sae, _DeviceOnly(), tmp_path, total_tokens=len(x) * epochs)  # type: ignore[arg-type]
    dead = []
    for _ in range(epochs):
        for batch in x[torch.randperm(len(x))].split(256):
            metrics = trainer.step(LoaderBatch(batch, torch.zeros(len(batch), dtype=torch.long)))
            dead.append(float(metrics["dead_pct"]))
    return dead


def test_auxk_revives_forced_dead_latents_and_the_logged_dead_share_falls(tmp_path):
    with_aux = _train_with_dead_latents(tmp_path / "aux", 1 / 32)
    without = _train_with_dead_latents(tmp_path / "none", 0.0)
    assert with_aux[0] >= 45.0 and without[0] >= 45.0, "half the latents start dead"
    assert with_aux[-1] <= 5.0, f"AuxK should revive the dead latents: {with_aux[0]:.0f}% -> {with_aux[-1]:.0f}%"
    assert without[-1] >= 40.0, f"without AuxK nothing revives them (else the test shows nothing): {without[-1]:.0f}%"
