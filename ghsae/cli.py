"""The `ghsae` command line. Each stage is one subcommand; flags override pipeline.toml."""

from __future__ import annotations

import errno
import functools
import json
import logging
import signal
import sys
import threading
from pathlib import Path

import click

from ghsae.config import PipelineConfig, load_config
from ghsae.errors import ConfigError, GhsaeError


class _Terminated(KeyboardInterrupt):
    """SIGTERM, turned into an exception so it unwinds like Ctrl-C (locks released, temp files removed)."""


def _raise_terminated(signum, frame) -> None:
    raise _Terminated()


def environment_message(e: OSError) -> str | None:
    """One line for an OSError the user's environment caused (full disk, read-only folder); None for others."""
    where = e.filename or "the run folder"
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return (
            f"disk full while writing {where} ({e.strerror}); free some space or use a --run-dir on a larger disk, "
            "then re-run the same command to resume"
        )
    if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return (
            f"cannot write {where} ({e.strerror}): the folder is read-only or not yours; make it writable or copy "
            "the run elsewhere, then re-run the same command to resume"
        )
    return None


def _user_errors(fn):
    """Print user errors as one clear line (no traceback) and exit 2; bugs keep their traceback.

    SIGINT and SIGTERM (a cluster job's usual end before its time limit) print one line and exit
    130 / 143, the shell's codes for those signals; everything ghsae writes is atomic, so the same
    command resumes.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        main_thread = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGTERM, _raise_terminated) if main_thread else None
        try:
            return fn(*args, **kwargs)
        except GhsaeError as e:
            click.echo(f"ghsae: error: {e}", err=True)
            sys.exit(2)
        except _Terminated:
            click.echo("ghsae: terminated (SIGTERM); re-run the same command to resume", err=True)
            sys.exit(143)
        except KeyboardInterrupt:
            click.echo("ghsae: interrupted; re-run the same command to resume", err=True)
            sys.exit(130)
        except OSError as e:
            message = environment_message(e)
            if message is None:
                raise
            click.echo(f"ghsae: error: {message}", err=True)
            sys.exit(2)
        finally:
            if main_thread:
                signal.signal(signal.SIGTERM, previous)

    return wrapper


def _parse_groups(text: str | None) -> str | int | list[list[int]] | None:
    """--groups auto | per-layer | G | 0-3,4-9,... (explicit inclusive ranges)."""
    if text is None or text in ("auto", "per-layer"):
        return text
    if text.isdigit():
        return int(text)
    try:
        return [[int(a), int(b)] for a, b in (part.split("-") for part in text.split(","))]
    except ValueError:
        raise ConfigError(f"--groups is {text!r}; expected auto, per-layer, a number, or ranges like 0-3,4-9") from None


def _config(config_path: str | None, overrides: dict) -> PipelineConfig:
    return load_config(config_path, overrides)


def _quiet_libraries(no_progress: bool) -> None:
    """--no-progress also silences transformers' own bars (model loading, GGUF de-quantising)."""
    if no_progress:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


@click.group()
@click.option("-v", "--verbose", is_flag=True, help="Log progress details.")
def main(verbose: bool) -> None:
    """ghsae: Group-SAEs, one sparse autoencoder per group of similar layers."""
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )


@main.command()
@click.option(
    "--config", "config_path", type=click.Path(dir_okay=False), help="pipeline.toml (default: the embedded one)."
)
@click.option("--run-dir", required=True, type=click.Path(file_okay=False), help="Run folder to create or resume.")
@click.option("--model", help="Model folder, .gguf file, hub id or builtin:smollm2-135m.")
@click.option("--dataset", help="Dataset file, folder or glob (.txt/.jsonl/.parquet) or builtin:python-docs.")
@click.option("--tokens", type=int, help="Token positions to harvest.")
@click.option("--seed", type=int, help="Seed of the layer draws and shuffles.")
@click.option("--groups", help="auto | per-layer | G | ranges like 0-3,4-9.")
@click.option("--device", help="auto | cpu | cuda | cuda:N.")
@click.option("--batch-size", type=int, help="Contexts per forward pass.")
@click.option(
    "--shard", "shard_spec", default="0/1", show_default=True, help="Run shards i, i+n, ... only (cluster array jobs)."
)
@click.option(
    "--plan-only", is_flag=True, help="Tokenise, probe and partition, then stop (the first step of an array job)."
)
@click.option("--overwrite", is_flag=True, help="Delete a run in --run-dir that has a different config.")
@click.option("--workers", type=int, help="Spread the shards over a local dask cluster of N worker processes.")
@click.option("--scheduler", help="Spread the shards over the dask cluster at this address (e.g. tcp://host:8786).")
@click.option("--no-progress", is_flag=True, help="No progress bars.")
@_user_errors
def harvest(
    config_path,
    run_dir,
    model,
    dataset,
    tokens,
    seed,
    groups,
    device,
    batch_size,
    shard_spec,
    plan_only,
    overwrite,
    workers,
    scheduler,
    no_progress,
):
    """Measure layer similarity, group the layers, and cache group-subsampled activations."""
    _quiet_libraries(no_progress)
    from ghsae.harvest.run import ShardSlice, summary_line
    from ghsae.harvest.run import harvest as run_harvest

    cfg = _config(
        config_path,
        {
            "model.path": model,
            "model.device": device,
            "data.dataset": dataset,
            "harvest.tokens": tokens,
            "harvest.seed": seed,
            "harvest.batch_size": batch_size,
            "grouping.groups": _parse_groups(groups),
        },
    )
    if workers or scheduler:
        from ghsae.distributed import cluster_client, harvest_on_cluster

        if shard_spec != "0/1" or plan_only:
            raise ConfigError("--shard and --plan-only split work by hand; with --workers/--scheduler dask does it")
        with cluster_client(workers, scheduler) as client:
            summary = harvest_on_cluster(cfg, Path(run_dir), client, overwrite, not no_progress)
    else:
        summary = run_harvest(cfg, Path(run_dir), ShardSlice.parse(shard_spec), overwrite, plan_only, not no_progress)
    click.echo(summary_line(summary))


@main.command()
@click.option(
    "--config", "config_path", type=click.Path(dir_okay=False), help="pipeline.toml (default: the embedded one)."
)
@click.option("--run-dir", required=True, type=click.Path(exists=True, file_okay=False), help="A harvested run folder.")
@click.option("--group", "groups", multiple=True, help="Train only this group (repeatable); default: every group.")
@click.option("--device", help="auto | cpu | cuda | cuda:N.")
@click.option("--architecture", help="topk | batchtopk | jumprelu | relu.")
@click.option("--tokens", type=int, help="Training tokens per SAE (0: one pass over the group's rows).")
@click.option("--allow-partial", is_flag=True, help="Train on the shards harvested so far.")
@click.option(
    "--overwrite",
    is_flag=True,
    help="Start over an SAE trained or begun with other fit settings or on another store (refused otherwise).",
)
@click.option("--workers", type=int, help="Train the groups in parallel on a local dask cluster of N processes.")
@click.option("--scheduler", help="Train the groups on the dask cluster at this address.")
@click.option("--no-progress", is_flag=True, help="No progress bars.")
@_user_errors
def fit(
    config_path,
    run_dir,
    groups,
    device,
    architecture,
    tokens,
    allow_partial,
    overwrite,
    workers,
    scheduler,
    no_progress,
):
    """Train one SAE per layer group from the run's activation store."""
    from ghsae.train.fit import fit as run_fit
    from ghsae.train.fit import summary_lines

    cfg = _config(config_path, {"fit.device": device, "fit.architecture": architecture, "fit.tokens": tokens})
    if workers or scheduler:
        from ghsae.distributed import cluster_client, fit_on_cluster

        with cluster_client(workers, scheduler) as client:
            results = fit_on_cluster(
                cfg, Path(run_dir), client, list(groups) or None, allow_partial, not no_progress, overwrite
            )
    else:
        results = run_fit(cfg, Path(run_dir), list(groups) or None, allow_partial, not no_progress, overwrite)
    for line in summary_lines(results):
        click.echo(line)


@main.command()
@click.option(
    "--config", "config_path", type=click.Path(dir_okay=False), help="pipeline.toml (default: the embedded one)."
)
@click.option("--run-dir", required=True, type=click.Path(exists=True, file_okay=False), help="A fitted run folder.")
@click.option(
    "--baseline",
    type=click.Path(exists=True, file_okay=False),
    help="A fitted per-layer run of the same model (harvest --groups per-layer) to compare with.",
)
@click.option("--allow-partial", is_flag=True, help="Report on the SAEs that exist when some are missing.")
@click.option(
    "--allow-unmatched",
    is_flag=True,
    help="Compare with a baseline whose SAEs trained on other than this run's tokens per SAE (the page shows the ratio).",
)
@click.option("--device", help="auto | cpu | cuda | cuda:N.")
@click.option("--tasks", help="Circuit tasks to measure per layer, e.g. ioi,greater-than,sva ('' for none).")
@click.option("--no-progress", is_flag=True, help="No progress bars.")
@_user_errors
def report(config_path, run_dir, baseline, allow_partial, allow_unmatched, device, tasks, no_progress):
    """Evaluate the run's SAEs on held-out tokens and write RUN/report/ (report.html, metrics.parquet, summary.md)."""
    _quiet_libraries(no_progress)
    from ghsae.analysis.report import write_report

    task_list = None if tasks is None else [t.strip() for t in tasks.split(",") if t.strip()]
    cfg = _config(config_path, {"report.device": device, "report.tasks": task_list})
    _check_run_readable(Path(run_dir))
    out = write_report(
        cfg,
        Path(run_dir),
        Path(baseline) if baseline else None,
        allow_partial,
        not no_progress,
        allow_unmatched=allow_unmatched,
    )
    click.echo(f"report: {out / 'report.html'}")


@main.command(name="run")
@click.option(
    "--config", "config_path", type=click.Path(dir_okay=False), help="pipeline.toml (default: the embedded one)."
)
@click.option(
    "--run-dir", default="runs/default", show_default=True, type=click.Path(file_okay=False), help="Run folder."
)
@click.option("--model", help="Model folder, .gguf file, hub id or builtin:smollm2-135m.")
@click.option("--dataset", help="Dataset file, folder or glob (.txt/.jsonl/.parquet) or builtin:python-docs.")
@click.option("--tokens", type=int, help="Token positions to harvest.")
@click.option("--groups", help="auto | per-layer | G | ranges like 0-3,4-9.")
@click.option("--device", help="auto | cpu | cuda | cuda:N (every stage).")
@click.option(
    "--baseline", type=click.Path(exists=True, file_okay=False), help="A fitted per-layer run to compare with."
)
@click.option("--overwrite", is_flag=True, help="Delete a run in --run-dir that has a different config.")
@click.option("--no-progress", is_flag=True, help="No progress bars.")
@_user_errors
def run_pipeline(config_path, run_dir, model, dataset, tokens, groups, device, baseline, overwrite, no_progress):
    """The whole pipeline: harvest, fit every group's SAE, report. Each stage resumes where it stopped."""
    _quiet_libraries(no_progress)
    import time

    from ghsae.analysis.report import write_report
    from ghsae.harvest.model import load_model
    from ghsae.harvest.run import ShardSlice, prepare_run_dir, summary_line
    from ghsae.harvest.run import harvest as run_harvest
    from ghsae.harvest.text import resolve_files
    from ghsae.layout import RunLayout
    from ghsae.train.fit import fit as run_fit
    from ghsae.train.fit import summary_lines

    cfg = _config(
        config_path,
        {
            "model.path": model,
            "model.device": device,
            "fit.device": device,
            "report.device": device,
            "data.dataset": dataset,
            "harvest.tokens": tokens,
            "grouping.groups": _parse_groups(groups),
        },
    )
    t0 = time.perf_counter()
    progress = not no_progress
    # a refused run folder or a missing dataset fails before the slow model load
    prepare_run_dir(RunLayout(Path(run_dir)), cfg, overwrite)
    resolve_files(cfg.data.dataset)
    lm = load_model(cfg.model.path, cfg.model.device, cfg.model.dtype)  # loaded once, for harvest and report
    click.echo(summary_line(run_harvest(cfg, Path(run_dir), ShardSlice(), overwrite, False, progress, lm=lm)))
    for line in summary_lines(run_fit(cfg, Path(run_dir), None, False, progress)):
        click.echo(line)
    out = write_report(cfg, Path(run_dir), Path(baseline) if baseline else None, False, progress, lm=lm)
    click.echo(f"report: {out / 'report.html'} ({time.perf_counter() - t0:,.0f} s in all)")


@main.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option(
    "--config", "config_path", type=click.Path(dir_okay=False), help="pipeline.toml (default: the embedded one)."
)
@click.option("--baseline", type=click.Path(exists=True, file_okay=False), help="A fitted per-layer run to mix in.")
@click.option("--latents", default=96, show_default=True, help="Latents drawn per SAE and per layer.")
@click.option("--out", type=click.Path(dir_okay=False), help="Page to write (default RUN/report/rating.html).")
@click.option("--score", "ratings", type=click.Path(exists=True, dir_okay=False), help="Score a downloaded CSV.")
@click.option("--device", help="auto | cpu | cuda | cuda:N.")
@_user_errors
def rate(run_dir, config_path, baseline, latents, out, ratings, device):
    """Blind interpretability rating: write a rating page, or (--score) unblind a downloaded ratings CSV."""
    from ghsae.analysis.rate import build_kit, score, table_lines

    if ratings:
        for line in table_lines(score(Path(run_dir), Path(ratings))):
            click.echo(line)
        click.echo(f"written to {Path(run_dir) / 'report' / 'ratings.json'}; the next `ghsae report` shows it")
        return
    _quiet_libraries(True)
    cfg = _config(config_path, {"report.device": device})
    page, key = build_kit(cfg, Path(run_dir), Path(baseline) if baseline else None, latents, out)
    click.echo(f"rating page: {page} ({len(key.items)} latents, kit {key.kit}); key kept in {Path(run_dir) / 'report'}")


@main.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--format", "fmt", default="saelens", show_default=True, help="Target format: saelens.")
@click.option("--overwrite", is_flag=True, help="Replace layer folders that already exist in OUT.")
@_user_errors
def export(run_dir, out, fmt, overwrite):
    """Write the run's SAEs for another library: one SAELens folder per layer, normalisation folded in."""
    from ghsae.train.export import export_run

    folders = export_run(Path(run_dir), Path(out), fmt, overwrite)
    click.echo(f"wrote {len(folders)} {fmt} SAE folders to {out} ({folders[0].name} .. {folders[-1].name})")


def _check_run_readable(run_dir: Path) -> None:
    """What `report` trusts, checked before the model load: config.json, tokens.npy, and every shard
    verified against its record (the SAEs were trained on those rows)."""
    from ghsae.cache.manifest import read_json, require_tokens
    from ghsae.cache.verify import verify_run
    from ghsae.errors import StoreError
    from ghsae.layout import RunLayout

    layout = RunLayout(run_dir)
    read_json(layout.config)
    require_tokens(layout)
    problems, _ = verify_run(layout)
    if problems:
        raise StoreError(
            problems[0]
            + (f" (and {len(problems) - 1} more problems: see `ghsae verify {run_dir}`)" if len(problems) > 1 else "")
        )


@main.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@_user_errors
def verify(run_dir):
    """Check a run folder against its records: every shard's files, row counts, layer ids and checksums,
    the plan's files, and each trained SAE's files. Writes nothing; exit 2 on any problem."""
    from ghsae.cache.verify import verify_run
    from ghsae.errors import StoreError
    from ghsae.layout import RunLayout
    from ghsae.train.io import load_sae

    layout = RunLayout(Path(run_dir))
    problems, shards = verify_run(layout)
    saes = sorted(p for p in layout.saes.iterdir() if p.is_dir()) if layout.saes.is_dir() else []
    for folder in saes:
        if layout.sae_trained(folder.name):
            try:
                load_sae(folder)
            except GhsaeError as e:
                problems.append(str(e))
            except Exception as e:  # a damaged safetensors file
                problems.append(f"{folder}: cannot load ({type(e).__name__}: {e}); re-run `ghsae fit` for it")
    for line in problems:
        click.echo(f"  {line}", err=True)
    if problems:
        raise StoreError(f"{run_dir}: {len(problems)} problems found (listed above)")
    click.echo(f"{run_dir}: {shards} shards and {len(saes)} SAE folders verified, no problems")


@main.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@_user_errors
def info(run_dir, as_json):
    """What a run folder holds: groups, shards done and missing, sizes."""
    from ghsae.cache.manifest import run_info
    from ghsae.layout import RunLayout

    data = run_info(RunLayout(Path(run_dir)))
    if as_json:
        click.echo(json.dumps(data))
        return
    click.echo(f"run {data['run_dir']} ({data['model']})")
    for name, g in zip(data["group_names"], data["groups"]):
        click.echo(f"  {name}: layers {g[0]}-{g[-1]} ({len(g)}), {data['rows_per_group'][name]:,} rows")
    click.echo(
        f"  shards {data['shards_done']}/{data['shards_total']} done"
        + (f", missing {data['shards_missing'][:20]}" if data["shards_missing"] else "")
    )
    click.echo(
        f"  SAEs {len(data['saes_trained'])}/{len(data['group_names'])} trained"
        + (f", missing {', '.join(data['saes_missing'])}" if data["saes_missing"] else "")
    )
    if data["bytes_per_token"]:
        click.echo(
            f"  {data['bytes_on_disk'] / 2**20:,.1f} MiB on disk, {data['bytes_per_token']:,.0f} B/token "
            f"(every layer would take {data['per_layer_bytes_per_token']:,} B/token: {data['storage_ratio']:.1f}x more)"
        )


if __name__ == "__main__":
    main()
