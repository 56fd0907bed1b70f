"""User-facing errors: the CLI prints these without a traceback.

`ConfigError` exits with code 2 (bad usage), every other `RlhfkitError` with code 1.
"""


class RlhfkitError(Exception):
    """A problem the user can fix (bad input, missing file, refused setting)."""

    exit_code = 1


class ConfigError(RlhfkitError):
    """Unknown config key, wrong type or bad value."""

    exit_code = 2
