"""Worker processes that stop with the command: the signals a terminal sends to the whole job are left to the
parent (``cli.run`` cleans up and stops the pool), and a worker ends with its parent however that ends."""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import os
import signal
import sys

# what a terminal sends to every process of the job (Ctrl-C, Ctrl-\, hang-up): the parent handles them (cli.run)
# and stops the pool with SIGTERM after its clean-up; the pool's processes never see them
JOB_SIGNALS = {signal.SIGINT, signal.SIGQUIT, signal.SIGHUP}


@contextlib.contextmanager
def job_signals_blocked():
    """``JOB_SIGNALS`` blocked in this thread inside the block, and so in every process started from it (a
    blocked mask survives exec) and every thread it starts: the pool's workers, the threads that respawn them,
    and multiprocessing's resource tracker (which ignores only SIGINT and SIGTERM; killed by SIGHUP, it
    is relaunched with tracebacks). A signal that arrives meanwhile is handled when the block ends."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, JOB_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


PR_SET_PDEATHSIG = 1  # prctl's option (<linux/prctl.h>): the signal a process gets when its parent ends


def end_with_parent() -> None:
    """On Linux, have the kernel send this process SIGKILL when the parent that started it ends, however it ends:
    a pool worker of a run killed with SIGKILL (no clean-up of the parent runs, the pool is never stopped) ends
    at once and silently, rather than finishing its image and failing, with a BrokenPipeError traceback, to hand
    the result to no one. Should the parent have ended already, this process ends now. Elsewhere nothing: a worker
    then ends when it next reads from the parent's closed pipe."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        failed = libc.prctl(ctypes.c_int(PR_SET_PDEATHSIG), ctypes.c_ulong(signal.SIGKILL), ctypes.c_ulong(0),
                            ctypes.c_ulong(0), ctypes.c_ulong(0))
    except (OSError, AttributeError):  # no C library to ask: as elsewhere
        return
    parent = multiprocessing.parent_process()
    if not failed and parent is not None and os.getppid() != parent.pid:  # it ended before the prctl
        os._exit(0)
