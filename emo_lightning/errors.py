"""User errors of the training side (see :mod:`data_tools.errors`: one line, exit 2, no traceback)."""

from __future__ import annotations

from data_tools.errors import ArgumentParser, UserError, run_cli

__all__ = ["ArgumentParser", "ConfigError", "UserError", "run_cli"]


class ConfigError(UserError, ValueError):
    """An invalid configuration value; the message starts with the key (``router.pool_min: must be ...``).

    A ``ValueError`` too, so that argument parsers treat it as a failed validation."""
