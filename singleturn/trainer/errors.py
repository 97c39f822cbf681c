"""`ConfigError`: below every trainer module, so data preparation and the stages can raise it
without importing the config package (which imports the stage registry to validate run.stages)."""

from __future__ import annotations


class ConfigError(ValueError):
    """A config that cannot run: unknown key, wrong type, or an impossible combination."""
