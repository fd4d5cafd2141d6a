"""User-facing errors: one line, no traceback (unless --log_level DEBUG)."""

from __future__ import annotations


class UserError(Exception):
    """A mistake in the user's input or configuration; the message is shown as is."""


def find_user_error(exc: BaseException) -> UserError | None:
    """Find a UserError inside exceptions wrapped by Ray (task errors, Ray Data wrappers).

    Ray re-raises task failures as classes derived from both RayTaskError and the original
    exception type, and Ray Data chains them through __cause__; walk both.
    """
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo:
        e = todo.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, UserError):
            return e
        cause = getattr(e, "cause", None)  # RayTaskError keeps the original here
        for nxt in (e.__cause__, e.__context__, cause):
            if isinstance(nxt, BaseException):
                todo.append(nxt)
    return None


def one_line(exc: BaseException) -> str:
    """The first non-blank line of an exception's message, or its type's name when it has none.

    The message is ``args[0]`` when that is a string: Ray's wrappers append their own traceback
    text to ``str()`` of a task error, never to the original message."""
    msg = exc.args[0] if exc.args and isinstance(exc.args[0], str) else str(exc)
    first = next((line.strip() for line in msg.splitlines() if line.strip()), "")
    return first or type(exc).__name__
