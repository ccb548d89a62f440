"""Experiment tracking (fit.log): the training metrics, as metrics.parquet logs them, sent to
TensorBoard and Weights & Biases too, where practitioners already look.

One tracked run per SAE, grouped by run folder: TensorBoard event files in RUN/tensorboard/<group>/,
a W&B run named after the group in the W&B group named after the run folder, its files in RUN/wandb/.
W&B runs offline unless WANDB_MODE says otherwise, so nothing leaves the machine; `wandb sync
RUN/wandb/offline-run-*` uploads later. Both are optional (`pip install 'ghsae[tracking]'`).
"""

from __future__ import annotations

import hashlib
import importlib
import os
import re
from pathlib import Path
from typing import Any, Protocol

from ghsae.config import TRACKERS
from ghsae.errors import ConfigError
from ghsae.layout import RunLayout

# the trainer's metric keys each tracker receives, at the steps metrics.parquet logs
TRACKED = ("loss", "fvu", "l0", "dead_pct", "lr", "tokens_per_s", "tokens")
_INSTALL = {"tensorboard": "pip install tensorboard", "wandb": "pip install wandb"}
_MODULE = {"tensorboard": "tensorboard", "wandb": "wandb"}


def check_installed(names: list[str]) -> None:
    """Refuse, before any training, a tracker fit.log names whose package cannot be imported."""
    for name in names:
        try:
            importlib.import_module(_MODULE[name])
        except ImportError:
            raise ConfigError(
                f"fit.log names {name} but the {name} package is not installed; install it with: "
                f"{_INSTALL[name]} (or pip install 'ghsae[tracking]'), or remove {name} from fit.log"
            ) from None


class Tracker(Protocol):
    def log(self, metrics: dict[str, float], step: int) -> None: ...

    def close(self) -> None: ...


class TensorBoard:
    """Scalars in RUN/tensorboard/<group>/; a resumed fit drops events past the step it resumes from."""

    def __init__(self, folder: Path, first_step: int):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: steps a killed session logged after its last checkpoint are logged again
        self.writer = SummaryWriter(str(folder), purge_step=first_step or None)

    def log(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(f"train/{key}", value, step)

    def close(self) -> None:
        self.writer.close()


class WandB:
    """One W&B run per SAE, offline unless WANDB_MODE is set; a resumed fit continues the same run id."""

    def __init__(self, layout: RunLayout, group: str, config: dict[str, Any]):
        import wandb

        try:
            self.run = self._init(wandb, layout, group, config)
        except Exception as e:  # noqa: BLE001 - wandb raises many kinds (network, auth, settings)
            raise ConfigError(
                f"W&B could not start the run of {group} ({' '.join(str(e).split())[:200]}); unset WANDB_MODE "
                "to log offline, or remove wandb from fit.log"
            ) from e

    @staticmethod
    def _init(wandb: Any, layout: RunLayout, group: str, config: dict[str, Any]) -> Any:
        return wandb.init(
            mode=None if "WANDB_MODE" in os.environ else "offline",
            dir=str(layout.root),  # wandb writes RUN/wandb/
            project=os.environ.get("WANDB_PROJECT", "ghsae"),
            group=layout.root.name,
            name=group,
            job_type="fit",
            id=wandb_run_id(layout.root, group),
            resume="allow",
            config=config,
            reinit="create_new",  # several SAEs of one fit in one process, one run each
        )

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log({f"train/{k}": v for k, v in metrics.items()}, step=step)

    def close(self) -> None:
        self.run.finish()


def wandb_run_id(root: Path, group: str) -> str:
    """Stable per SAE (a resumed fit logs into the same run), distinct between run folders of one name."""
    digest = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:8]
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", root.name)[:40]
    return f"{name}-{group}-{digest}"


class Tracking:
    """The trackers fit.log names for one SAE: opened when its training starts, fed each logged row."""

    def __init__(self, names: list[str], layout: RunLayout, group: str, config: dict[str, Any]):
        self.names, self.layout, self.group, self.config = names, layout, group, config
        self.trackers: list[Tracker] = []

    def open(self, first_step: int) -> None:
        for name in self.names:
            if name == "tensorboard":
                self.trackers.append(TensorBoard(self.layout.tensorboard(self.group), first_step))
            else:
                self.trackers.append(WandB(self.layout, self.group, self.config))

    def log(self, row: dict[str, float]) -> None:
        metrics = {k: float(row[k]) for k in TRACKED if k in row}
        for tracker in self.trackers:
            tracker.log(metrics, int(row["step"]))

    def close(self) -> None:
        while self.trackers:
            self.trackers.pop().close()


assert set(_INSTALL) == set(TRACKERS), "every tracker fit.log accepts has its install command"
