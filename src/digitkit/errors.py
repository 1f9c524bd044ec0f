"""User-facing errors. The CLI prints these as one line; anything else is a bug and keeps its traceback."""


class DigitkitError(Exception):
    """An error the user can act on: the message says what was wrong, what was expected and what to do."""


class ConfigError(DigitkitError):
    """A bad config file, key, value or override."""


class DataError(DigitkitError):
    """A missing, truncated, corrupted or inconsistent data file."""
