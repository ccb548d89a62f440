"""Whose folder is this? Recognising, claiming and overwriting a run folder.

A run folder is recognised by RUN/ghsae-run.json, a marker ghsae writes (with its format
version) before anything else, never by a generic name such as config.json: a transformers
model folder has a config.json too, and `--overwrite` once deleted one. Folders made
before the marker existed are recognised by their config.json holding ghsae's own keys next to
plan/plan.json, and get the marker when next claimed.

--overwrite removes only the names ghsae writes (layout.RUN_TREE: at the top and inside each of
its folders, saes/ and report/ included) and keeps anything else (a NOTES.md, a notebook, a note
beside an SAE), saying which files it kept; a folder of ghsae's that still holds such a file stays.
A file of the user's inside plan/ or acts.zarr/, which a harvest replaces whole, makes it refuse
before removing anything. It needs the run lock exclusively, so it is refused while another ghsae
process works in the folder.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import shutil
import time
from pathlib import Path

from ghsae.atomic import read_json
from ghsae.config import PipelineConfig
from ghsae.errors import DamagedFileError, RunDirError
from ghsae.layout import (
    LOCKS_DIR,
    REBUILT_WHOLE,
    RUN_FORMAT,
    RUN_FORMAT_VERSION,
    RUN_TREE,
    STAGING_PREFIX,
    OwnedTree,
    RunLayout,
)
from ghsae.locks import FileLock, hold_run, try_lock, wait_lock
from ghsae.records import Plan, RunConfig, RunMarker, load_record, save_record

log = logging.getLogger(__name__)

_LEGACY_CONFIG_KEYS = {"identity", "resolved", "hash"}


def _own_entries(root: Path) -> list[Path]:
    return [p for p in root.iterdir() if not p.name.startswith(STAGING_PREFIX) and p.name != LOCKS_DIR]


def is_run_folder(layout: RunLayout) -> bool:
    """A ghsae run: its marker, or (made before markers) ghsae's own config.json beside plan/plan.json."""
    if layout.marker.is_file():
        marker = RunMarker.from_json(read_json(layout.marker, fix="delete it only if this folder is not a ghsae run"))
        if marker.format != RUN_FORMAT:
            raise RunDirError(f"{layout.marker} is not a ghsae run marker; this folder is not a ghsae run")
        if marker.version > RUN_FORMAT_VERSION:
            raise RunDirError(
                f"{layout.root} was made by a newer ghsae (run format {marker.version}, this one reads "
                f"{RUN_FORMAT_VERSION}); upgrade ghsae or use another --run-dir"
            )
        return True
    if layout.config.is_file() and layout.plan.is_file():
        try:
            data = json.loads(layout.config.read_text())
        except (ValueError, UnicodeDecodeError):
            return False
        return isinstance(data, dict) and _LEGACY_CONFIG_KEYS <= set(data)
    return False


def prepare_run_dir(layout: RunLayout, cfg: PipelineConfig, overwrite: bool) -> list[str]:
    """Check, without writing, that this command may use the folder; returns the config differences
    that --overwrite will clear (empty when the run is this config's or the folder is new)."""
    root = layout.root
    if not root.exists():
        return []
    if not root.is_dir():
        raise RunDirError(f"run folder {root} is a file; choose a folder path for --run-dir")
    if not _own_entries(root):
        return []
    if not is_run_folder(layout):
        raise RunDirError(
            f"{root} is not empty and holds no {layout.marker.name}: not a ghsae run folder (a model folder or "
            "your own files). ghsae never writes into it, even with --overwrite; choose an empty or new --run-dir"
        )
    diffs = run_config_diffs(layout, cfg)
    if diffs and overwrite:
        refuse_rebuilt_user_files(root, RUN_TREE, "--overwrite")
    if diffs and not overwrite:
        raise RunDirError(
            f"{root} holds a run with a different config ({'; '.join(diffs[:6])}{'; ...' if len(diffs) > 6 else ''}). "
            "Use another --run-dir, or pass --overwrite to delete that run"
        )
    return diffs


def run_config_diffs(layout: RunLayout, cfg: PipelineConfig) -> list[str]:
    if layout.config.is_file():
        try:
            return _config_diffs(dict(load_record(RunConfig, layout.config).identity), cfg.identity())
        except DamagedFileError:
            if not layout.plan.is_file():
                return [f"{layout.config} is damaged"]
            # config.json is derived from the config: with a plan of this config, it is rewritten
    if layout.plan.is_file():
        # killed between the plan's rename and config.json: the plan's hash still identifies the run
        planned = load_record(Plan, layout.plan).config_hash
        if planned != cfg.identity_hash():
            return [f"config hash {planned} in the run, {cfg.identity_hash()} now"]
    return []


def _config_diffs(old: dict, new: dict) -> list[str]:
    diffs = []
    for section in sorted(set(old) | set(new)):
        a, b = old.get(section, {}), new.get(section, {})
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                diffs.append(f"{section}.{key}: {a.get(key)!r} in the run, {b.get(key)!r} now")
    return diffs


def claim_run_dir(layout: RunLayout, cfg: PipelineConfig, overwrite: bool) -> FileLock:
    """Create or join the run folder: its marker written, the run lock held shared (returned), and,
    with --overwrite and another config in it, what ghsae wrote removed first."""
    prepare_run_dir(layout, cfg, overwrite)  # checked again: another process may have changed it
    layout.root.mkdir(parents=True, exist_ok=True)
    run_lock = hold_run(layout)
    try:
        diffs = prepare_run_dir(layout, cfg, overwrite)
        if diffs:
            _wipe(layout, run_lock, diffs)
        if not layout.marker.is_file():
            save_record(layout.marker, RunMarker(RUN_FORMAT, RUN_FORMAT_VERSION, time.time()))
    except BaseException:
        run_lock.release()
        raise
    return run_lock


def _wipe(layout: RunLayout, run_lock: FileLock, diffs: list[str]) -> None:
    """--overwrite: under the exclusive run lock, remove ghsae's files and nothing else."""
    run_lock.release()
    exclusive = try_lock(layout.lock("run"))
    if exclusive is None:
        raise RunDirError(
            f"--overwrite refused: another ghsae process is working in {layout.root} (a harvest, fit or report, "
            "or a second --overwrite started with this one, holds its run lock); wait for it to finish (or stop it), "
            "then re-run this command"
        )
    try:
        log.warning("--overwrite: removing run %s (its config differs: %s)", layout.root, "; ".join(diffs[:6]))
        warn_kept(layout.root, remove_owned(layout.root, RUN_TREE))
    finally:
        exclusive.release()
    again = wait_lock(layout.lock("run"), f"run folder {layout.root}", shared=True)
    run_lock.fd, again.fd = again.fd, None


# --- what ghsae wrote, and only that -------------------------------------------------------------


def _owned(tree: OwnedTree, name: str) -> tuple[bool, OwnedTree | None]:
    """Whether ghsae writes `name` here, and the tree of what it writes inside (None: all of it)."""
    for pattern, sub in tree.items():
        if fnmatch.fnmatchcase(name, pattern):
            return True, sub
    return False, None


def remove_owned(folder: Path, tree: OwnedTree, dry_run: bool = False) -> list[Path]:
    """Remove what ghsae wrote in `folder` (by `tree`, walked into its folders) and nothing else;
    returns the user's entries kept, as paths (a user's folder once, not each file in it). A folder
    of ghsae's left holding a user's file stays. Never follows a symlink."""
    kept: list[Path] = []
    for p in sorted(folder.iterdir()):
        ours, sub = _owned(tree, p.name)
        if p.name == LOCKS_DIR:
            continue  # lock files belong to whoever works here, and are no one's data
        if not ours:
            kept.append(p)
        elif p.is_symlink() or sub is None:  # a symlink at one of ghsae's names goes, never what it points to
            if not dry_run:
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        elif p.is_dir():
            kept += remove_owned(p, sub, dry_run)
            if not dry_run and not any(p.iterdir()):
                p.rmdir()
        else:
            kept.append(p)  # a file where ghsae writes a folder is the user's
    return kept


def refuse_rebuilt_user_files(root: Path, tree: OwnedTree, what: str) -> None:
    """Before removing anything: a user's file inside plan/ or acts.zarr/ (which the next harvest
    replaces whole, deleting it) is refused, naming it."""
    inside = [p for p in remove_owned(root, tree, dry_run=True) if _under_rebuilt(p.relative_to(root))]
    if inside:
        names = ", ".join(str(p.relative_to(root)) for p in inside[:5])
        raise RunDirError(
            f"{what} refused: {root} holds files ghsae did not write inside a folder it rebuilds whole ({names}); "
            "move them out of that folder, then re-run with --overwrite"
        )


def _under_rebuilt(relative: Path) -> bool:
    parts = list(relative.parts)
    # a run folder inside the run (per-layer/, seed<s>/, nested) has plan/ and acts.zarr/ of its own
    while len(parts) > 1 and _owned(RUN_TREE, parts[0])[1] is RUN_TREE:
        parts.pop(0)
    return parts[0] in REBUILT_WHOLE


def warn_kept(root: Path, kept: list[Path], what: str = "--overwrite") -> None:
    """Name the user's entries a removal kept, by their path relative to `root`."""
    names = [str(p.relative_to(root)) for p in kept]
    if names:
        more = f" and {len(names) - 10} more" if len(names) > 10 else ""
        log.warning("%s kept %d entries ghsae did not write: %s%s", what, len(names), ", ".join(names[:10]), more)
