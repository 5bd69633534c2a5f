"""Expected failures and the one line a user sees for each.

An `ExpectedError` is bad input or a broken file the user can fix: its message names the file,
rank or key and what to do. `masep` prints it as one line (with `-v` or MASEP_TRACEBACK=1, the
traceback too). A rank's failure reaches the launching process as the rank's whole traceback
(submitit), so `one_line` cuts that to the rank's exception message and the log holding the rest.
"""
from __future__ import annotations

import re

# The last line of a Python traceback: `package.module.SomeError: message`.
_EXCEPTION_LINE = re.compile(r"^(?:[A-Za-z_][\w.]*\.)?([A-Za-z_]\w*(?:Error|Exception|Interrupt|Exit)): (.+)$")
_FAILED_TASK = re.compile(r"task (\d+) of \d+ failed")
# Expected errors whose message needs no class name in front of it.
EXPECTED_NAMES = {"ConfigError", "ShardError", "CheckpointError", "C4ReadError", "TokenizerFilesError",
                  "LaunchError", "PeerCommError"}


class ExpectedError(Exception):
    """A failure the user can fix; its message is the one line shown (see `one_line`)."""


def one_line(e: BaseException) -> str:
    """The message of `e` as one line; for a failed rank, its own exception and log file."""
    if isinstance(e.__cause__, ExpectedError):  # a rank run in this process (debug executor)
        return one_line(e.__cause__)
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    if not lines:
        return type(e).__name__
    failed = next((m for m in map(_FAILED_TASK.search, lines) if m), None)
    causes = [m for m in map(_EXCEPTION_LINE.match, lines) if m]
    stderr = next((line.split("stderr: ", 1)[1] for line in lines if line.startswith("stderr: ")), None)
    if failed is None or not causes:
        return lines[0] + (f" (logs: {stderr})" if stderr else "")
    name, message = causes[-1].groups()
    shown = message if name in EXPECTED_NAMES else f"{name}: {message}"
    return f"rank {failed[1]}: {shown}" + (f" (traceback: {stderr})" if stderr else "")

