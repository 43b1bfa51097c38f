"""User-facing errors.

A `UserError` is a mistake the user can fix (bad config, bad data, missing credentials). The CLI prints its
message as one line on stderr and exits with code 2, never with a traceback. `TrainingDiverged` (a non-finite
loss or gradient norm) is told the same way with exit code 3. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

EXIT_USER_ERROR = 2


class UserError(Exception):
    """A problem in the user's input: one line that names the thing and what to do."""

    exit_code = EXIT_USER_ERROR

    def __str__(self) -> str:
        # Always one line, whatever the caller passed in.
        return " ".join(super().__str__().split())


class TrainingDiverged(UserError):
    """The loss or gradient norm went non-finite: the run stops before anything of that state is saved."""

    exit_code = 3


def find_user_error(exc: BaseException) -> UserError | None:
    """The UserError behind an exception that crossed a Ray boundary (task, actor, Train worker), if any."""
    import re

    stack, seen = [exc], set()
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, UserError):
            return e
        stack += [getattr(e, "cause", None), e.__cause__, e.__context__]
        stack += list((getattr(e, "worker_failures", None) or {}).values())
    m = re.search(r"gl_ray\.errors\.(UserError|TrainingDiverged): ([^\n]*)", str(exc))
    if not m:
        return None
    return (TrainingDiverged if m.group(1) == "TrainingDiverged" else UserError)(m.group(2))


@contextlib.contextmanager
def unwrap_user_errors() -> Iterator[None]:
    """Re-raise an exception that carries a UserError (e.g. wrapped by a Ray task, actor or Train worker) as that
    UserError alone; any other exception is a bug and propagates unchanged."""
    try:
        yield
    except Exception as e:
        user = find_user_error(e)
        if user is None or user is e:
            raise
        raise user from None
