"""Fit throughput against its limit: the same SAE trained on the same rows already in memory.

    python bench/fit.py --run-dir RUN [--group group_00] [--tokens 65536] [--device auto]
                        [--expansion 16] [--k 128] [--batch-size 4096]

RUN is a harvested run folder (for example runs/default from the README's command). Prints one
JSON line:
- `store_tok_s`: training tokens/s with batches from the Zarr store through ActivationLoader;
- `memory_tok_s`: the same SAE, same initialisation, on the same rows already normalised and
  resident as one tensor on the device (the limit the loader can approach);
- `ratio` = store / memory (aim: >= 0.95);
- `loader_gb_s`: the loader alone (read, shuffle, widen, normalise, copy to the device), in GB
  of stored bytes per second, beside `raw_read_gb_s`: a sequential read of the same shard files;
  `host_gb_s`: its host path alone (read and shuffle into batch arrays: what is shipped to a GPU,
  which widens and normalises there), with `host_vs_raw` and `loader_vs_raw`;
- `peers_tok_s`: the same step shape in EleutherAI sparsify and SAELens when they are installed
  (`pip install -e .[peers]`, see setup.cfg; bench/peers.py), on the same in-memory rows, with
  `memory_vs_<peer>` = ghsae's in-memory tokens/s over theirs.

`--rounds N` repeats the in-memory comparison N times in this process (interleaved), so the
spread on a shared machine shows. `--threads N` sets torch's threads for everything measured (on
a CPU shared with other jobs, 2 threads spend most of their time waiting for each other).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from ghsae.cache.loader import LoaderBatch
from ghsae.config import load_config
from ghsae.device import pick_device
from ghsae.run import Run
from ghsae.sae import SAEConfig, build_sae
from ghsae.train.fit import group_loader
from ghsae.train.trainer import Trainer

try:
    from peers import peer_rates  # bench/peers.py, beside this script
except ImportError:  # run as a module from elsewhere
    from bench.peers import peer_rates


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_tok_s(trainer: Trainer, batches, device: torch.device) -> float:
    n = 0
    t0 = time.perf_counter()
    for batch in batches:
        trainer.step(batch)
        n += batch.x.shape[0]
    sync(device)
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--group", default="group_00")
    ap.add_argument("--tokens", type=int, default=65536)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--expansion", type=int, default=16)
    ap.add_argument("--k", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=4096)
    ap.add_argument("--rounds", type=int, default=1, help="repeat the in-memory comparison this many times")
    ap.add_argument("--no-peers", action="store_true", help="skip sparsify and SAELens")
    ap.add_argument("--threads", type=int, default=0, help="torch threads for everything measured (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    run = Run.open(args.run_dir)
    layout, store, d = run.layout, run.store, run.plan.d_model
    fit_cfg = load_config(None).fit
    data = group_loader(run, fit_cfg, args.group, run.done_shards(), device, batch_size=args.batch_size)
    layers, scale, loader = data.layers, data.scale, data.loader
    n_batches = max(1, min(args.tokens, loader.rows_per_epoch) // args.batch_size)

    # loader alone over a whole epoch (keeping the first n_batches for the in-memory run),
    # and a raw sequential read of the same files
    t0 = time.perf_counter()
    resident, delivered = [], 0
    for i, b in enumerate(loader.batches(0)):
        if i < n_batches:
            resident.append(b)
        delivered += b.x.shape[0]
    sync(device)
    loader_s = time.perf_counter() - t0
    stored_bytes = delivered * store.geometry.act_bytes_per_row
    t0 = time.perf_counter()
    host_rows = sum(len(x) for x, _ in loader.host_batches(0))  # the host path alone: what a GPU is fed
    host_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    files = [store.shard_file(args.group, "acts", s) for s in run.done_shards()]
    raw = sum(len(p.read_bytes()) for p in files if p.is_file())
    raw_s = time.perf_counter() - t0

    def fresh_trainer() -> Trainer:
        torch.manual_seed(0)
        sae = build_sae(SAEConfig("topk", d, args.expansion * d, layers, k=args.k)).to(device)
        sae.set_normalisation(scale)
        return Trainer(fit_cfg, sae, loader, layout.root / "bench-unused", total_tokens=10**12)

    warm = fresh_trainer()
    train_tok_s(warm, resident[:2], device)  # warm-up: kernels, allocator
    m = args.expansion * d
    xs = [b.x for b in resident]
    memory_runs: list[float] = []
    store_runs: list[float] = []
    peer_runs: dict[str, list[float]] = {}
    for _ in range(args.rounds):
        memory_runs.append(train_tok_s(fresh_trainer(), (LoaderBatch(b.x, b.layer) for b in resident), device))
        store_runs.append(
            train_tok_s(fresh_trainer(), (b for i, b in zip(range(n_batches), loader.batches(0))), device)
        )
        if not args.no_peers:
            for name, rate in peer_rates(xs, d, m, args.k, warm.base_lr, device).items():
                peer_runs.setdefault(name, []).append(rate)
    memory, store_rate = max(memory_runs), max(store_runs)
    result = {
        "device": str(device),
        "threads": torch.get_num_threads(),
        "group": args.group,
        "d": d,
        "n_latents": m,
        "k": args.k,
        "batch_size": args.batch_size,
        "tokens": n_batches * args.batch_size,
        "store_tok_s": round(store_rate, 1),
        "memory_tok_s": round(memory, 1),
        "ratio": round(store_rate / memory, 3),  # best against best; per round below when --rounds > 1
        "host_gb_s": round(host_rows * store.geometry.act_bytes_per_row / host_s / 1e9, 3),
        "loader_gb_s": round(stored_bytes / loader_s / 1e9, 3),
        "raw_read_gb_s": round(raw / raw_s / 1e9, 3),
        "host_vs_raw": round((host_rows * store.geometry.act_bytes_per_row / host_s) / (raw / raw_s), 3),
        "loader_vs_raw": round((stored_bytes / loader_s) / (raw / raw_s), 3),
    }
    if args.rounds > 1:
        result["memory_tok_s_rounds"] = [round(r, 1) for r in memory_runs]
        result["store_tok_s_rounds"] = [round(r, 1) for r in store_runs]
        result["ratio_rounds"] = [round(a / b, 3) for a, b in zip(store_runs, memory_runs)]
    for name, runs in peer_runs.items():
        result[f"{name}_tok_s"] = runs if len(runs) > 1 else runs[0]
        # per round, ghsae over the peer measured right after it (the machine's load drifts)
        result[f"memory_vs_{name}"] = [round(a / b, 2) for a, b in zip(memory_runs, runs)]
    print(json.dumps(result))


if __name__ == "__main__":
    main()
