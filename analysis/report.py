"""`ghsae report`: evaluate a fitted run (and optionally a per-layer baseline) and write RUN/report/.

    report.html      one self-contained page: evals, baseline comparison, clustering, compute, latents
    metrics.parquet  one row per (SAE, layer)
    summary.md       the headline tables as Markdown

The evals run on the run's held-out contexts (tokens.npy after the harvested ones); with a baseline,
baseline.py checks from both runs' shard records that neither run harvested them.
"""

from __future__ import annotations

import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ghsae.analysis.baseline import check_baseline_data, check_baseline_tokens
from ghsae.analysis.circuit_report import make_tasks
from ghsae.analysis.circuit_report import measure as measure_circuits
from ghsae.analysis.circuits import CircuitTarget
from ghsae.analysis.dashboards import report_views
from ghsae.analysis.evals import EvalResult, EvalTarget, evaluate
from ghsae.analysis.metrics import mmcs
from ghsae.analysis.rate import load_scores
from ghsae.cache.manifest import Plan, load_plan, read_json, run_info, write_bytes_atomic
from ghsae.config import PipelineConfig
from ghsae.errors import ConfigError, StoreError
from ghsae.harvest.model import LoadedModel, load_model
from ghsae.harvest.partition import amad, complete_linkage, solve
from ghsae.harvest.similarity import DISTANCES, canonical_distance, distance_matrix
from ghsae.layout import RunLayout
from ghsae.train.io import METRICS, SAE_CONFIG, load_sae

log = logging.getLogger(__name__)


@dataclass
class RunSide:
    """One run's SAEs and bookkeeping, as the report needs them."""

    layout: RunLayout
    plan: Plan
    targets: list[EvalTarget]
    fit_seconds: dict[str, float]
    fit_tokens: dict[str, int]
    folders: dict[str, Path]  # each target's SAE folder, by target name


def load_side(run_dir: Path, kind: str, allow_partial: bool) -> RunSide:
    layout = RunLayout(run_dir)
    plan = load_plan(layout)
    have = [g for g in plan.group_names if layout.sae_trained(g)]
    missing = [g for g in plan.group_names if g not in have]
    what = "run" if kind == "group" else "baseline run"
    if not have:
        raise StoreError(f"the {what} {run_dir} has no trained SAE; run `ghsae fit --run-dir {run_dir}` first")
    if missing and not allow_partial:
        raise StoreError(
            f"the {what} {run_dir} has no trained SAE for {', '.join(missing)}; run `ghsae fit --run-dir {run_dir}` "
            "for them, or pass --allow-partial to report on the SAEs that exist"
        )
    targets, seconds, tokens, folders = [], {}, {}, {}
    for g in have:
        folder = layout.sae_dir(g)
        name = g if kind == "group" else f"per-layer {g}"
        targets.append(EvalTarget(name, kind, load_sae(folder)))
        folders[name] = folder
        meta = read_json(folder / SAE_CONFIG)
        seconds[name] = float(meta.get("seconds", float("nan")))
        tokens[name] = int(meta.get("tokens", 0))
    return RunSide(layout, plan, targets, seconds, tokens, folders)


def eval_contexts(layout: RunLayout, plan: Plan) -> np.ndarray:
    n_eval = int(plan.data.get("n_contexts_eval", 0))
    if n_eval == 0:
        raise ConfigError(
            f"{layout.root} holds no held-out tokens (harvest.eval_tokens was 0); the report evaluates on them. "
            "Harvest again with harvest.eval_tokens > 0"
        )
    tokens = np.load(layout.tokens, mmap_mode="r")
    return np.asarray(tokens[plan.n_contexts_harvest : plan.n_contexts_harvest + n_eval])


def harvest_seconds(layout: RunLayout, plan: Plan) -> float | None:
    """A: the measured wall time of the plan step plus every shard (None when not recorded)."""
    info_seconds = plan.data.get("seconds")
    shards = [read_json(layout.shard_record(s)).get("seconds") for s in range(plan.n_shards)]
    if info_seconds is None or any(s is None for s in shards):
        return None
    return float(info_seconds) + float(sum(shards))


def compute_account(run: RunSide, base: RunSide | None) -> dict:
    """A + G*T against A + L*T, with the measured A and T; storage against every layer's."""
    info = run_info(run.layout)
    L, G = len(run.plan.layers), len(run.plan.groups)
    A = harvest_seconds(run.layout, run.plan)
    T_group = float(np.mean(list(run.fit_seconds.values())))
    account = {
        "layers": L,
        "groups": G,
        "harvest_seconds": A,
        "fit_seconds_per_sae": T_group,
        "fit_tokens_per_sae": int(np.mean(list(run.fit_tokens.values()))),
        "grouped_total_seconds": (A or 0.0) + G * T_group,
        "bytes_on_disk": info["bytes_on_disk"],
        "bytes_per_token": info["bytes_per_token"],
        "per_layer_bytes_per_token": info["per_layer_bytes_per_token"],
        "storage_ratio": info["storage_ratio"],
    }
    if base is not None:
        binfo = run_info(base.layout)
        A_base = harvest_seconds(base.layout, base.plan)
        T_base = float(np.mean(list(base.fit_seconds.values())))
        account.update(
            per_layer_source="measured on the baseline run",
            per_layer_harvest_seconds=A_base,
            per_layer_fit_seconds_per_sae=T_base,
            per_layer_total_seconds=(A_base or 0.0) + L * T_base,
            per_layer_bytes_on_disk=binfo["bytes_on_disk"],
        )
    else:
        account.update(
            per_layer_source="estimated: same A, L SAEs at this run's measured T",
            per_layer_harvest_seconds=A,
            per_layer_fit_seconds_per_sae=T_group,
            per_layer_total_seconds=(A or 0.0) + L * T_group,
            per_layer_bytes_on_disk=None,
        )
    account["speedup"] = account["per_layer_total_seconds"] / max(account["grouped_total_seconds"], 1e-9)
    return account


def clustering(layout: RunLayout, plan: Plan) -> dict:
    """Both grouping methods' AMAD curves and partitions, and the G that `auto` picks for each
    method and distance, from the run's stored probe (runs planned before grouping.method existed
    used the DP)."""
    sim = np.load(layout.similarity)
    layers = sim["layers"].tolist()
    am = plan.data["amad"]
    distance = canonical_distance(am["distance"])
    method = am.get("method", "dp")
    objective = am["objective"] if method == "dp" else "layer-mean"
    threshold = float(am["threshold"])
    G = len(plan.groups)
    pos = {layer: i for i, layer in enumerate(layers)}

    def named(part: list[list[int]]) -> list[list[int]]:
        return [[layers[i] for i in g] for g in part]

    solutions = {
        d: {
            "dp": solve(distance_matrix(sim, d), "dp", objective),
            "agglomerative": solve(distance_matrix(sim, d), "agglomerative"),
        }
        for d in DISTANCES
    }
    dist = distance_matrix(sim, distance)
    mine = solutions[distance]
    unconstrained = complete_linkage(dist, G)
    auto = [
        {
            "distance": d,
            "method": _method_label(m, objective),
            "groups": sol.auto_groups(threshold),
            "amad": float(sol.amad[sol.auto_groups(threshold) - 1]),
            "partition": named(sol.partitions[sol.auto_groups(threshold) - 1]),
        }
        for d, by_method in solutions.items()
        for m, sol in by_method.items()
    ]
    return {
        "layers": layers,
        "raw": distance_matrix(sim, "raw"),
        "layer-centred": distance_matrix(sim, "layer-centred"),
        "distance": distance,
        "method": _method_label(method, objective),
        "threshold": threshold,
        "curves": {_method_label(m, objective): sol.amad for m, sol in mine.items()},
        "at_g": [
            {
                "method": _method_label(m, objective),
                "partition": named(sol.partitions[G - 1]),
                "amad": float(sol.amad[G - 1]),
            }
            for m, sol in mine.items()
        ]
        + [
            {
                "method": "complete linkage, unconstrained (not forced contiguous)",
                "partition": named(unconstrained),
                "amad": amad(dist, unconstrained),
            }
        ],
        "auto": auto,
        "chosen_groups": plan.groups,
        "chosen_amad": amad(dist, [[pos[x] for x in g] for g in plan.groups]),
        "probe_tokens": plan.data.get("probe_tokens"),
    }


def _method_label(method: str, objective: str) -> str:
    return "agglomerative (complete linkage, adjacent)" if method == "agglomerative" else f"dp ({objective})"


def mmcs_rows(run: RunSide, base: RunSide) -> list[dict]:
    """For each layer: MMCS between the group SAE's decoder and that layer's per-layer SAE decoder."""
    base_by_layer = {t.sae.cfg.layers[0]: t for t in base.targets}
    rows = []
    for t in run.targets:
        for layer in t.sae.cfg.layers:
            b = base_by_layer.get(layer)
            if b is not None:
                rows.append({"layer": layer, "sae": t.name, "mmcs": mmcs(t.sae.W_dec.detach(), b.sae.W_dec.detach())})
    return rows


def training_curves(side: RunSide) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    curves = {}
    for t in side.targets:
        path = side.folders[t.name] / METRICS
        if path.is_file():
            table = pq.read_table(path, columns=["tokens", "fvu"])
            curves[t.name] = (table["tokens"].to_numpy(), table["fvu"].to_numpy())
    return curves


def token_strings(lm: LoadedModel, contexts: np.ndarray) -> dict[int, str]:
    """Readable text of every token id in the eval contexts (byte-level markers turned into spaces)."""
    ids = np.unique(contexts).tolist()
    tok = lm.tokenizer
    return {i: tok.decode([i], clean_up_tokenization_spaces=False) for i in ids}


def write_report(
    cfg: PipelineConfig,
    run_dir: Path,
    baseline_dir: Path | None = None,
    allow_partial: bool = False,
    progress: bool = True,
    lm: LoadedModel | None = None,
    allow_unmatched: bool = False,
) -> Path:
    from ghsae.analysis.page import render_page, render_summary

    run = load_side(Path(run_dir), "group", allow_partial)
    base, fairness = None, None
    if baseline_dir is not None:
        base_layout = RunLayout(Path(baseline_dir))
        base_plan = load_plan(base_layout)
        check_baseline_data(run.layout, run.plan, base_layout, base_plan)  # before loading any SAE
        base = load_side(Path(baseline_dir), "baseline", allow_partial)
        fairness = check_baseline_tokens(run.plan, run.fit_tokens, base.layout, base.fit_tokens, allow_unmatched)
    contexts = eval_contexts(run.layout, run.plan)
    rc = cfg.report
    if lm is None:
        model_path = json.loads(run.layout.config.read_text())["identity"]["model"]["path"]  # as harvested
        lm = load_model(model_path, rc.device, "auto")
    if lm.fingerprint != run.plan.data["model"]["fingerprint"]:
        raise ConfigError(
            f"the model loaded for the report ({lm.source.description}) is not the one {run_dir} was harvested with"
        )
    targets = run.targets + (base.targets if base else [])
    # generated before the slow evals: a task the tokenizer cannot express fails here
    tasks = make_tasks(rc.tasks, lm.tokenizer, rc.task_prompts, cfg.fit.seed)
    ctx_len = contexts.shape[1]
    result = evaluate(
        lm,
        contexts,
        targets,
        run.plan.data["tokenizer"]["special_ids"],
        ce_contexts=-(-rc.ce_tokens // ctx_len),
        batch_contexts=rc.batch_contexts,
        latents_sampled=4 * rc.latents_shown,
        examples_per_latent=rc.examples_per_latent,
        seed=cfg.fit.seed,
        progress=progress,
    )
    out = run.layout.report
    out.mkdir(exist_ok=True)
    _write_parquet(out / "metrics.parquet", result)
    special = run.plan.data["tokenizer"]["special_ids"]
    circuits = None
    if tasks:
        circuit_targets = [CircuitTarget(t.name, t.kind, t.sae) for t in targets]
        circuits = measure_circuits(lm, tasks, circuit_targets, run.plan.groups, rc, cfg.fit.seed, out)
    data = {
        "run": run,
        "base": base,
        "fairness": fairness,
        "result": result,
        "clustering": clustering(run.layout, run.plan),
        "compute": compute_account(run, base),
        "mmcs": mmcs_rows(run, base) if base else [],
        "curves": {**training_curves(run), **(training_curves(base) if base else {})},
        "contexts": contexts,
        "token_text": token_strings(lm, contexts),
        "report_cfg": rc,
        "circuits": circuits,
        "dashboards": report_views(lm, contexts, special, targets, result.examples, rc),
        "ratings": load_scores(out),
    }
    _write_text(out / "report.html", render_page(data))
    _write_text(out / "summary.md", render_summary(data))
    return out


def _write_parquet(path: Path, result: EvalResult) -> None:
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(result.rows), buffer)
    write_bytes_atomic(path, buffer.getbuffer())


def _write_text(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))
