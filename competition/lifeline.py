"""Child processes that die with their parent, however the parent dies (SIGKILL included).

``die_with_parent(parent_pid)`` runs first thing in a child (a ``ProcessPoolExecutor`` initializer):
on Linux it asks the kernel for SIGKILL when the parent goes (``prctl(PR_SET_PDEATHSIG)``); everywhere
it also starts a watchdog thread that ends the process once its parent pid changes (the orphan was
handed to another process), checked every ``POLL_S`` seconds. ``parent_death_signal`` alone is the
``preexec_fn`` of a ``subprocess`` (the signal survives its exec; a thread would not).
A parent already gone when the child starts ends it at once. The child's own DataLoader workers
watch it the same way (torch's worker loop), so a whole training tree goes with the parent.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys
import threading
import time

POLL_S = 1.0
_PR_SET_PDEATHSIG = 1


def parent_death_signal(sig: int = signal.SIGKILL) -> bool:
    """Ask the Linux kernel to send ``sig`` to this process when its parent dies; False where unavailable."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def die_with_parent(parent_pid: int, poll_s: float = POLL_S) -> None:
    """End this process when ``parent_pid`` is no longer its parent (kernel signal and a watchdog thread)."""
    parent_death_signal()
    if os.getppid() != parent_pid:   # gone before the signal was asked for
        os._exit(1)

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(poll_s)
        os._exit(1)

    threading.Thread(target=watch, name="die-with-parent", daemon=True).start()
