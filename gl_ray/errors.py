"""User-facing errors.

A `UserError` is a mistake the user can fix (bad config, bad data, missing credentials). The CLI prints its
message as one line on stderr and exits with code 2, never with a traceback. Anything else is a bug and keeps
its traceback.
"""

from __future__ import annotations

EXIT_USER_ERROR = 2


class UserError(Exception):
    """A problem in the user's input: one line that names the thing and what to do."""

    def __str__(self) -> str:
        # Always one line, whatever the caller passed in.
        return " ".join(super().__str__().split())
