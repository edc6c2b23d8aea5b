"""Errors a user can cause.

A :class:`UserError` is caught at the CLI edge and rendered as one line on stderr with exit
status 2 and no traceback. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user: printed as one line, exit status 2."""

    exit_code = 2

    def __init__(self, message: str) -> None:
        # Keep it to one line: the CLI prints exactly this.
        super().__init__(" ".join(message.split()))


class OutputWriteError(UserError):
    """An output could not be written (disk full, file-size limit, no permission): one line, exit 1.

    Not bad input, so not status 2; the earlier version of the file, if any, is left as it was.
    ``path``, ``errno`` and ``reason`` are those of the failed write, for callers that report it
    their own way (a checkpoint names its errno).
    """

    exit_code = 1

    def __init__(self, path: object, errno: int | None, reason: str) -> None:
        super().__init__(f"{path}: cannot write: {reason}")
        self.path = path
        self.errno = errno
        self.reason = reason
