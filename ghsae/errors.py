"""User-facing errors. Each message says what was found, what was expected and how to fix it.

The CLI prints these without a traceback; anything else is a bug and keeps its traceback.
"""


class GhsaeError(Exception):
    """Base class for errors caused by the user's input or files, not by a bug."""


class ConfigError(GhsaeError):
    """pipeline.toml or a CLI flag holds something invalid."""


class ModelError(GhsaeError):
    """The model cannot be found, loaded, or does not fit the config."""


class DatasetError(GhsaeError):
    """The dataset cannot be found or read, or holds too little text."""


class RunDirError(GhsaeError):
    """The run folder holds something other than what this command was asked to make."""


class StoreError(GhsaeError):
    """The activation store is incomplete, corrupt, or does not match what is asked of it."""


class HarvestError(GhsaeError):
    """A harvest cannot go on (for example a float16 overflow)."""


class DamagedFileError(StoreError):
    """A file of the run folder is unreadable (empty, truncated, not the format ghsae wrote)."""


class DiskError(GhsaeError):
    """The disk is full, or the folder cannot be written: an environment problem, resumable once fixed."""
