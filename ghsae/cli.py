"""The `ghsae` command line: one subcommand per stage, each a thin call into ghsae.pipeline.

Options shared by several commands are defined once below. Settings come from the run folder
when it exists (ghsae.pipeline.settings_for), else from --config or the embedded pipeline.toml;
flags override them.
"""

from __future__ import annotations

import errno
import functools
import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path

import click

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


def _quiet_libraries(no_progress: bool) -> None:
    """--no-progress also silences transformers' own bars (model loading, GGUF de-quantising)."""
    if no_progress:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


# --- options shared by several commands, defined once ----------------------------------------


def _compose(*decorators):
    def apply(fn):
        for d in reversed(decorators):
            fn = d(fn)
        return fn

    return apply


config_option = click.option(
    "--config", "config_path", type=click.Path(dir_okay=False), help="pipeline.toml (default: the run's own settings, else the embedded one)."
)
device_option = click.option("--device", help="auto | cpu | cuda | cuda:N.")
progress_option = click.option("--no-progress", is_flag=True, help="No progress bars.")
allow_partial_option = click.option("--allow-partial", is_flag=True, help="Work with the shards / SAEs that exist so far.")
baseline_option = click.option(
    "--baseline",
    type=click.Path(exists=True, file_okay=False),
    help="A fitted per-layer run of the same model (harvest --groups per-layer) to compare with.",
)
executor_options = _compose(
    click.option(
        "--workers", type=int, help="Run the tasks on a local dask cluster of N worker processes (at most one per core)."
    ),
    click.option("--scheduler", help="Run the tasks on the dask cluster at this address (e.g. tcp://host:8786)."),
)
every_stage_device_option = click.option("--device", help="auto | cpu | cuda | cuda:N (every stage).")
source_options = _compose(
    click.option("--model", help="Model folder, .gguf file, hub id or builtin:smollm2-135m."),
    click.option("--dataset", help="Dataset file, folder or glob (.txt/.jsonl/.parquet) or builtin:python-docs."),
)
data_options = _compose(
    source_options,
    click.option("--tokens", type=int, help="Token positions to harvest."),
    click.option("--groups", help="auto | per-layer | G | ranges like 0-3,4-9."),
)


def _new_or_existing_dir(ctx, param, value: str | None) -> str | None:
    """A --run-dir to create or resume: a symbolic link whose target is missing cannot be either."""
    path = Path(value) if value is not None else None
    if path is not None and path.is_symlink() and not path.exists():
        _refuse(
            f"--run-dir {path} is a symbolic link to {os.readlink(path)}, which does not exist; create that folder "
            "or pass another --run-dir"
        )
    return value


def _refuse(message: str) -> None:
    """A user error found before a command's body (in an option's callback or the group): one line, exit 2."""
    click.echo(f"ghsae: error: {message}", err=True)
    sys.exit(2)


def _existing_run_dir(help_text: str):
    return click.option("--run-dir", required=True, type=click.Path(exists=True, file_okay=False), help=help_text)


def _executor(workers: int | None, scheduler: str | None, no_progress: bool):
    from ghsae.executors import open_executor

    return open_executor(workers, scheduler, progress=not no_progress)


def _check_room(cfg, run_dir: str) -> None:
    """An impossible --tokens is refused before any folder is made (a planned run resumes unchecked:
    its token array is on the disk already)."""
    from ghsae.harvest.text import require_room_for_tokens
    from ghsae.layout import RunLayout

    layout = RunLayout(Path(run_dir))
    if layout.plan.is_file() or RunLayout(layout.per_layer).plan.is_file():
        return
    require_room_for_tokens(Path(run_dir), cfg.harvest.tokens, cfg.harvest.eval_tokens, cfg.data.context_length)


def _check_groupings_fit_model(cfg, groupings: list[str]) -> None:
    """Every numbered grouping against the layers to harvest, counted from the model's config (no weights
    loaded), before the sweep tokenises and probes: the sweep checks them again on its probe."""
    from ghsae.harvest.plan import check_groups_fit, resolve_layers
    from ghsae.lm import layer_count

    n_layers = layer_count(cfg.model.path)
    if n_layers is None:
        return
    layers = resolve_layers(cfg.grouping.layers, n_layers)
    for g in groupings:
        if g.isdigit():
            check_groups_fit(int(g), layers, cfg.grouping.last_layer)


def _data_overrides(model, dataset, tokens, groups, device) -> dict:
    return {
        "model.path": model,
        "model.device": device,
        "data.dataset": dataset,
        "harvest.tokens": tokens,
        "grouping.groups": _parse_groups(groups),
    }


def _every_stage_overrides(model, dataset, tokens, groups, device) -> dict:
    """_data_overrides with --device for fit and report too (the commands that run every stage)."""
    return {**_data_overrides(model, dataset, tokens, groups, device), "fit.device": device, "report.device": device}


@click.group()
@click.option("-v", "--verbose", is_flag=True, help="Log progress details.")
def main(verbose: bool) -> None:
    """ghsae: Group-SAEs, one sparse autoencoder per group of similar layers."""
    from ghsae import faults

    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        faults.check()
    except ConfigError as e:
        _refuse(str(e))


@main.command()
@config_option
@click.option(
    "--run-dir", required=True, type=click.Path(file_okay=False), callback=_new_or_existing_dir,
    help="Run folder to create or resume.",
)
@data_options
@click.option("--seed", type=int, help="Seed of the layer draws and shuffles.")
@device_option
@click.option("--batch-size", type=int, help="Contexts per forward pass.")
@click.option(
    "--shard", "shard_spec", default="0/1", show_default=True, help="Run shards i, i+n, ... only (cluster array jobs)."
)
@click.option(
    "--plan-only", is_flag=True, help="Tokenise, probe and partition, then stop (the first step of an array job)."
)
@click.option("--overwrite", is_flag=True, help="Delete a run in --run-dir that has a different config.")
@executor_options
@progress_option
@_user_errors
def harvest(
    config_path, run_dir, model, dataset, tokens, groups, seed, device, batch_size, shard_spec, plan_only, overwrite,
    workers, scheduler, no_progress,
):  # fmt: skip
    """Measure layer similarity, group the layers, and cache group-subsampled activations."""
    from ghsae import pipeline
    from ghsae.harvest.steps import ShardSlice, summary_line

    _quiet_libraries(no_progress)
    overrides = _data_overrides(model, dataset, tokens, groups, device)
    overrides.update({"harvest.seed": seed, "harvest.batch_size": batch_size})
    cfg = pipeline.settings_for(run_dir, config_path, overrides)
    _check_room(cfg, run_dir)
    shards = ShardSlice.parse(shard_spec)
    if (workers is not None or scheduler) and (not shards.whole or plan_only):
        raise ConfigError("--shard and --plan-only split work by hand; with --workers/--scheduler dask does it")
    with _executor(workers, scheduler, no_progress) as ex:
        summary = pipeline.harvest(
            cfg, run_dir, ex, shards=shards, overwrite=overwrite, plan_only=plan_only, progress=not no_progress
        )
    click.echo(summary_line(summary))


@main.command()
@config_option
@_existing_run_dir("A harvested run folder.")
@click.option("--group", "groups", multiple=True, help="Train only this group (repeatable); default: every group.")
@device_option
@click.option("--architecture", help="topk | batchtopk | jumprelu | relu.")
@click.option("--tokens", type=int, help="Training tokens per SAE (0: one pass over the group's rows).")
@allow_partial_option
@click.option(
    "--overwrite",
    is_flag=True,
    help="Train again SAEs trained or begun with other fit settings or on another store (refused otherwise).",
)
@executor_options
@progress_option
@_user_errors
def fit(config_path, run_dir, groups, device, architecture, tokens, allow_partial, overwrite, workers, scheduler, no_progress):
    """Train one SAE per layer group from the run's activation store."""
    from ghsae import pipeline
    from ghsae.train.fit import summary_lines

    overrides = {"fit.device": device, "fit.architecture": architecture, "fit.tokens": tokens}
    cfg = pipeline.settings_for(run_dir, config_path, overrides, sections=("fit",))
    with _executor(workers, scheduler, no_progress) as ex:
        results = pipeline.fit(
            cfg,
            run_dir,
            ex,
            groups=list(groups) or None,
            allow_partial=allow_partial,
            overwrite=overwrite,
            progress=not no_progress,
        )
    for line in summary_lines(results):
        click.echo(line)


@main.command()
@config_option
@_existing_run_dir("A fitted run folder.")
@baseline_option
@allow_partial_option
@click.option(
    "--allow-unmatched",
    is_flag=True,
    help="Compare with a baseline whose SAEs trained on other than this run's tokens per SAE (the page shows the ratio).",
)
@device_option
@click.option("--tasks", help="Circuit tasks to measure per layer, e.g. ioi,greater-than,sva ('' for none).")
@executor_options
@progress_option
@_user_errors
def report(config_path, run_dir, baseline, allow_partial, allow_unmatched, device, tasks, workers, scheduler, no_progress):
    """Evaluate the run's SAEs on held-out tokens and write RUN/report/ (report.html, metrics.parquet, summary.md)."""
    from ghsae import pipeline

    _quiet_libraries(no_progress)
    task_list = None if tasks is None else [t.strip() for t in tasks.split(",") if t.strip()]
    cfg = pipeline.settings_for(run_dir, config_path, {"report.device": device, "report.tasks": task_list}, ("report",))
    with _executor(workers, scheduler, no_progress) as ex:
        out = pipeline.report(
            cfg,
            run_dir,
            ex,
            baseline=baseline,
            allow_partial=allow_partial,
            allow_unmatched=allow_unmatched,
            progress=not no_progress,
        )
    click.echo(f"report: {out / 'report.html'}")


@main.command(name="run")
@config_option
@click.option(
    "--run-dir", default="runs/default", show_default=True, type=click.Path(file_okay=False),
    callback=_new_or_existing_dir, help="Run folder.",
)
@data_options
@every_stage_device_option
@baseline_option
@click.option("--overwrite", is_flag=True, help="Replace a run in --run-dir made with other settings.")
@executor_options
@progress_option
@_user_errors
def run_pipeline(
    config_path, run_dir, model, dataset, tokens, groups, device, baseline, overwrite, workers, scheduler, no_progress
):  # fmt: skip
    """The whole pipeline: harvest, fit every group's SAE, report. Each stage resumes where it stopped."""
    import time

    from ghsae import pipeline

    _quiet_libraries(no_progress)
    overrides = _every_stage_overrides(model, dataset, tokens, groups, device)
    cfg = pipeline.settings_for(run_dir, config_path, overrides)
    _check_room(cfg, run_dir)
    t0 = time.perf_counter()
    with _executor(workers, scheduler, no_progress) as ex:
        out = pipeline.run_all(
            cfg, run_dir, ex, baseline=baseline, overwrite=overwrite, progress=not no_progress, say=click.echo
        )
    click.echo(f"report: {out / 'report.html'} ({time.perf_counter() - t0:,.0f} s in all)")


@main.command()
@config_option
@click.option(
    "--run-dir", required=True, type=click.Path(file_okay=False), callback=_new_or_existing_dir,
    help="Sweep folder to create or resume.",
)
@click.option(
    "--groups",
    "groupings",
    default="2,3,4,6,8,auto,per-layer",  # ghsae.sweep.DEFAULT_GROUPINGS (tested)
    show_default=True,
    help="Groupings to compare: numbers of groups, auto (the AMAD rule's G) and per-layer.",
)
@source_options
@click.option("--tokens", type=int, help="Token positions to harvest (once, every layer).")
@click.option("--fit-tokens", type=int, help="Training tokens per SAE, the same for every grouping (0: one pass).")
@click.option(
    "--budgets",
    help="Training tokens per SAE to train every grouping at (compare.budgets), e.g. 131072,524288: one harvest of "
    "the largest; a budget trained before is kept.",
)
@click.option(
    "--lr-grid", help="Learning rates to pick each arm's from on a validation split (compare.lr_grid), e.g. 1e-3,3e-3,1e-2."
)
@click.option(
    "--transfer",
    default="",
    help="Groupings also trained with transfer from the previous group, e.g. G4,G8 (the per-layer SAEs then too).",
)
@click.option(
    "--seeds", type=int, help="Seeds per grouping (compare.seeds): each gap gets a standard error across seeds too."
)
@click.option(
    "--seeds-at-smallest",
    type=int,
    help="Seeds per grouping at the smallest budget (compare.seeds_at_smallest), where training is cheapest.",
)
@every_stage_device_option
@click.option("--overwrite", is_flag=True, help="Replace a sweep in --run-dir of other groupings or settings.")
@executor_options
@progress_option
@_user_errors
def sweep(
    config_path, run_dir, groupings, model, dataset, tokens, fit_tokens, budgets, lr_grid, transfer, seeds,
    seeds_at_smallest, device, overwrite, workers, scheduler, no_progress,
):  # fmt: skip
    """Quality against compute: harvest every layer once, derive one run per G, train every grouping's SAEs
    at equal tokens per SAE, and write SWEEP/report/sweep.html (the paper's figure for this model)."""
    import time

    from ghsae import pipeline
    from ghsae import sweep as sweeps

    _quiet_libraries(no_progress)
    overrides = {**_every_stage_overrides(model, dataset, tokens, None, device), "fit.tokens": fit_tokens}
    compare = {
        "compare.seeds": seeds,
        "compare.seeds_at_smallest": seeds_at_smallest,
        "compare.budgets": sweeps.parse_budgets(budgets) if budgets else None,
        "compare.lr_grid": sweeps.parse_lrs(lr_grid) if lr_grid else None,
    }
    cfg = pipeline.settings_for(None, config_path, {**overrides, **compare})
    _check_room(cfg, run_dir)
    names = sweeps.parse_groupings(groupings)
    _check_groupings_fit_model(cfg, names)
    transfers = [t.strip() for t in transfer.split(",") if t.strip()]
    t0 = time.perf_counter()
    with _executor(workers, scheduler, no_progress) as ex:
        out = sweeps.sweep(
            cfg, run_dir, ex, groupings=names, transfer=transfers, overwrite=overwrite, progress=not no_progress,
            say=click.echo,
        )  # fmt: skip
    click.echo(f"sweep: {out / 'sweep.html'} ({time.perf_counter() - t0:,.0f} s in all)")


@main.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@config_option
@baseline_option
@click.option("--latents", default=96, show_default=True, help="Latents drawn per SAE and per layer.")
@click.option("--out", type=click.Path(dir_okay=False), help="Page to write (default RUN/report/rating.html).")
@click.option("--score", "ratings", type=click.Path(exists=True, dir_okay=False), help="Score a downloaded CSV.")
@device_option
@_user_errors
def rate(run_dir, config_path, baseline, latents, out, ratings, device):
    """Blind interpretability rating: write a rating page, or (--score) unblind a downloaded ratings CSV."""
    from ghsae import pipeline
    from ghsae.analysis.rate import build_kit, score, table_lines
    from ghsae.run import Run

    if ratings:
        for line in table_lines(score(Path(run_dir), Path(ratings))):
            click.echo(line)
        click.echo(f"written to {Path(run_dir) / 'report' / 'ratings.json'}; the next `ghsae report` shows it")
        return
    _quiet_libraries(True)
    cfg = pipeline.settings_for(run_dir, config_path, {"report.device": device}, ("report",))
    run = Run.open(run_dir)
    base = Run.open(baseline) if baseline else None
    page, key = build_kit(cfg, run, pipeline.report_model(cfg, run), base, latents, Path(out) if out else None)
    click.echo(f"rating page: {page} ({len(key.items)} latents, kit {key.kit}); key kept in {run.layout.report}")


@main.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--format", "fmt", default="saelens", show_default=True, help="Target format: saelens or sparsify.")
@click.option("--unit-decoder", is_flag=True, help="Unit-norm decoder rows (the layer's scale moved into the latents).")
@click.option("--overwrite", is_flag=True, help="Replace layer folders (and OUT/README.md) that already exist.")
@_user_errors
def export(run_dir, out, fmt, unit_decoder, overwrite):
    """Write the run's SAEs for another library: one folder per layer, named by the library's hook
    name, normalisation folded in, each with a README.md model card."""
    from ghsae.run import Run
    from ghsae.train.export import export_run

    folders = export_run(Run.open(run_dir), Path(out), fmt, overwrite, unit_decoder)
    click.echo(f"wrote {len(folders)} {fmt} SAE folders to {out} ({folders[0].name} .. {folders[-1].name})")


@main.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@_user_errors
def verify(run_dir):
    """Check a run folder against its records: every shard's files, row counts, layer ids and checksums,
    the plan's files, and each trained SAE's files. Writes nothing; exit 2 on any problem."""
    from ghsae.errors import StoreError
    from ghsae.run import Run

    run = Run.open(run_dir)
    problems, shards = run.verify()
    sae_problems, saes = run.verify_saes()
    problems += sae_problems
    for line in problems:
        click.echo(f"  {line}", err=True)
    if problems:
        raise StoreError(f"{run_dir}: {len(problems)} problems found (listed above)")
    click.echo(f"{run_dir}: {shards} shards and {saes} SAE folders verified, no problems")


@main.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@_user_errors
def info(run_dir, as_json):
    """What a run folder holds: groups, shards done and missing, sizes."""
    from ghsae.layers import span
    from ghsae.run import Run

    run = Run.open(run_dir)
    data = run.info()
    if as_json:
        click.echo(json.dumps(data.to_json()))
        return
    click.echo(f"run {data.run_dir} ({data.model}): {run.plan.grouping.describe(run.plan.layers)}")
    for name, g in zip(data.group_names, data.groups):
        click.echo(f"  {name}: layers {span(g)} ({len(g)}), {data.rows_per_group[name]:,} rows")
    click.echo(f"  hookpoint {data.hookpoint}")
    click.echo(
        f"  shards {data.shards_done}/{data.shards_total} done"
        + (f", missing {data.shards_missing[:20]}" if data.shards_missing else "")
    )
    if data.store_problems:
        click.echo(f"  store incomplete: {len(data.store_problems)} metadata files lost, e.g. {data.store_problems[0]}")
    click.echo(
        f"  SAEs {len(data.saes_trained)}/{len(data.group_names)} trained"
        + (f", missing {', '.join(data.saes_missing)}" if data.saes_missing else "")
    )
    if data.bytes_per_token:
        click.echo(
            f"  {data.bytes_on_disk / 2**20:,.1f} MiB on disk, {data.bytes_per_token:,.0f} B/token "
            f"(every layer would take {data.per_layer_bytes_per_token:,} B/token: {data.storage_ratio:.1f}x more)"
        )


@main.command(name="config")
@click.argument("run_dir", required=False, type=click.Path(exists=True, file_okay=False))
@config_option
@_user_errors
def show_config(run_dir, config_path):
    """Print the settings a command would run with, as pipeline.toml: a run's own (RUN given), or the
    --config file's, or the embedded default's. Redirect it to a file to start a config from."""
    from ghsae import pipeline
    from ghsae.config import to_toml
    from ghsae.run import Run

    if run_dir is not None:
        Run.open(run_dir)  # a folder given must be a run: its settings, never the defaults in its name
    click.echo(to_toml(pipeline.settings_for(run_dir, config_path, {})), nl=False)


if __name__ == "__main__":
    main()
