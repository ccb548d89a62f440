"""Hugging Face Hub ids (models, datasets, SAEs) resolved through the local Hugging Face cache only.

Nothing is downloaded: huggingface_hub's snapshot_download with local_files_only finds the
snapshot folder of a repository the cache holds, and the folder's name is the commit the id
resolved to, which the run records. The cache is the one huggingface_hub uses (HF_HUB_CACHE,
else HF_HOME/hub, else ~/.cache/huggingface/hub), read from the environment at each call.

An id is `org/name` (or a bare `name`), optionally followed by a folder inside the repository
(`org/name/layers.5`: one SAE of several) and a revision (`org/name@v1.0`, a branch, tag or commit).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from ghsae.errors import GhsaeError

_PART = r"[A-Za-z0-9][A-Za-z0-9_.\-]*"
_HUB_ID = re.compile(rf"^(?P<repo>{_PART}(?:/{_PART})?)(?P<sub>(?:/{_PART})*)(?:@(?P<rev>[A-Za-z0-9_.\-/]+))?$")


@dataclass(frozen=True)
class HubId:
    repo_id: str
    subfolder: str  # "" for the repository's root
    revision: str | None  # as asked (None: main)


@dataclass(frozen=True)
class HubSnapshot:
    """A repository's files as the cache holds them at one commit."""

    repo_id: str
    revision: str  # the commit hash the id resolved to
    folder: Path  # the snapshot folder, or the asked subfolder inside it


def parse_hub_id(spec: str) -> HubId | None:
    """The parts of a Hub id, or None for what cannot be one (a path starting with . / ~, a suffix)."""
    if spec.startswith((".", "/", "~")) or (os.sep != "/" and os.sep in spec):
        return None
    match = _HUB_ID.match(spec)
    if match is None:
        return None
    return HubId(match["repo"], match["sub"].lstrip("/"), match["rev"])


def hub_cache() -> Path:
    """The Hugging Face hub cache huggingface_hub would use in this environment."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.path.expandvars(os.environ[var])).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(os.path.expandvars(home)).expanduser() / "hub"


def cached_snapshot(hub: HubId, repo_type: str, what: str, error: type[GhsaeError]) -> HubSnapshot:
    """The cached snapshot of `hub` (repo_type model or dataset), or `error` naming the id and the cache.

    `what` names the setting for the message ("model", "dataset", "SAE")."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    cache = hub_cache()
    try:
        path = snapshot_download(
            hub.repo_id, repo_type=repo_type, revision=hub.revision, cache_dir=cache, local_files_only=True
        )
    except (HFValidationError, OSError, ValueError):
        revision = f" at revision {hub.revision}" if hub.revision else ""
        kind = "--repo-type dataset " if repo_type == "dataset" else ""
        raise error(
            f"{what} {hub.repo_id!r} is not a local path, and the Hugging Face cache {cache} holds no {repo_type} "
            f"{hub.repo_id}{revision} (ghsae reads the Hub only through that cache, offline); fetch it with "
            f"`hf download {kind}{hub.repo_id}` (HF_HOME or HF_HUB_CACHE name the cache), or pass a local path"
        ) from None
    snapshot = Path(str(path))
    folder = snapshot / hub.subfolder if hub.subfolder else snapshot
    if not folder.is_dir():
        raise error(
            f"the cached {repo_type} {hub.repo_id} (commit {snapshot.name}, {snapshot}) has no folder "
            f"{hub.subfolder!r}; expected one of: {', '.join(sorted(p.name for p in snapshot.iterdir() if p.is_dir())) or 'none'}"
        )
    return HubSnapshot(hub.repo_id, snapshot.name, folder)
