"""User-facing errors. The CLI prints these as one line; anything else is a bug and keeps its traceback."""

import re


class DigitkitError(Exception):
    """An error the user can act on: the message says what was wrong, what was expected and what to do."""


class ConfigError(DigitkitError):
    """A bad config file, key, value or override."""


class DataError(DigitkitError):
    """A missing, truncated, corrupted or inconsistent data file."""


def plain_message(e: BaseException) -> str:
    """An exception's message without Python object reprs (PIL's "cannot identify image file <_io.BytesIO object at
    0x7f...>"): a user is told what was wrong with their input, not our internals."""
    text = re.sub(r"\s*<[^<>]* (object )?at 0x[0-9a-fA-F]+>", "", str(e)).strip()
    return text or type(e).__name__
