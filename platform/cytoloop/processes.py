"""Whether a process is alive, for state left behind by processes that may have been killed (a PID file of the
local stack, a replica's private download folder in the shared model cache)."""

from __future__ import annotations

import os


def alive(pid: int) -> bool:
    """True while process `pid` runs on this host (under any user). A zombie child of the caller counts as dead
    (and is reaped): it has ended, only its exit status is left."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, under another user
        return True
    try:
        return os.waitpid(pid, os.WNOHANG) == (0, 0)
    except ChildProcessError:  # not our child: alive, as kill said
        return True
