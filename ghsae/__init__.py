"""ghsae: Group-SAEs, one sparse autoencoder per group of similar contiguous layers.

The public face, in a few names:

    import ghsae
    run = ghsae.open_run("runs/default")        # a harvested (and fitted) run folder
    sae = run.sae("group_01")                   # or run.sae_for_layer(14), or ghsae.load_sae(folder)
    z = sae.encode(x, layer=14)                 # x: raw residuals [n, d] at block 14's output
    x_hat = sae.decode(z, layer=14)             # back in layer 14's raw units
    lm = run.model()                             # the model it was harvested from

and the stages as functions in ghsae.pipeline (harvest, fit, report, run_all; `ghsae.harvest` is
the harvest stage's package). Names are imported when first used, so `import ghsae` stays light
(the CLI starts without loading torch).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "Run": "ghsae.run",
    "RunInfo": "ghsae.run",
    "open_run": "ghsae.run",
    "load_sae": "ghsae.sae",
    "SparseAutoencoder": "ghsae.sae",
    "SAEConfig": "ghsae.sae",
    "load_model": "ghsae.lm",
    "LoadedModel": "ghsae.lm",
    "capture_layers": "ghsae.hooks",
    "PipelineConfig": "ghsae.config",
    "load_config": "ghsae.config",
    "open_executor": "ghsae.executors",
}
_MODULES = ("pipeline", "records", "errors", "train")  # `ghsae.pipeline.harvest(...)` without importing it first

__all__ = [
    "LoadedModel",
    "PipelineConfig",
    "Run",
    "RunInfo",
    "SAEConfig",
    "SparseAutoencoder",
    "__version__",
    "capture_layers",
    "load_config",
    "load_model",
    "load_sae",
    "open_executor",
    "open_run",
]

if TYPE_CHECKING:
    from ghsae.config import PipelineConfig, load_config
    from ghsae.executors import open_executor
    from ghsae.hooks import capture_layers
    from ghsae.lm import LoadedModel, load_model
    from ghsae.run import Run, RunInfo, open_run
    from ghsae.sae import SAEConfig, SparseAutoencoder, load_sae


def __getattr__(name: str) -> Any:
    if name in _MODULES:
        return importlib.import_module(f"ghsae.{name}")
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'ghsae' has no attribute {name!r}")


def __dir__() -> list[str]:
    """The public names and the stage modules, for dir() and tab completion (the lazy exports are
    not in the module's namespace until first used)."""
    return sorted({*globals(), *__all__, *_MODULES})
