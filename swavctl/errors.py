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
    """

    exit_code = 1
