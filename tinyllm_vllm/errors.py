"""The kit's errors: one base class, so callers (the CLI above all) catch them in one place.

Each message names the file, field, flag or process it is about, and what to do.
"""


class TinyllmError(Exception):
    """Base of every error the kit raises for bad input or a failed process."""


class ConfigError(TinyllmError, ValueError):
    """A TinyLLM config.json field holds a value this kit cannot run."""


class CheckpointError(TinyllmError, ValueError):
    """A source checkpoint cannot be found, downloaded or prepared."""


class ServerError(TinyllmError, RuntimeError):
    """A vLLM server (or the router in front of several) could not start, or died."""


class SettingsError(TinyllmError, ValueError):
    """A ``TINYLLM_*`` setting holds a value that cannot be used."""
