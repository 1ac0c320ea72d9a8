"""The process tree of a launch: children do not outlive the command that started them.

``colbertkit train`` starts ``accelerate launch`` in its own process group (so that Ctrl-C is
forwarded once, then the group supervised), and accelerate starts the workers. When the command
is killed outright (SIGKILL, an OOM killer, a closed SSH session's hard kill) nothing forwards
anything: without help the launch would keep training in the background and keep writing
checkpoints into a run the user believes stopped, racing the ``--resume`` they start next.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent(sig: int = signal.SIGKILL) -> bool:
    """Ask Linux to send ``sig`` to this process when its parent exits; True if arranged.

    Elsewhere (macOS, Windows) this does nothing and returns False. If the parent exited
    before the request took hold, the process sends ``sig`` to itself at once.
    """
    if not sys.platform.startswith("linux"):
        return False
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    if os.getppid() != parent:
        os.kill(os.getpid(), sig)
    return True
