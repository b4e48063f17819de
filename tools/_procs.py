"""Process helpers the client tools share: which local process is the GenServe server behind a worker pid.

Workers are forked from a forkserver (workers.start_method: forkserver), which is itself a child of the API process;
with ``spawn`` they are the API process's own children. Either way the API process is the nearest ancestor that
is not the forkserver.
"""

from __future__ import annotations

import contextlib

import psutil


def listens_on(proc: psutil.Process, port: int) -> bool | None:
    """Whether proc has a listening TCP socket on port; None when that cannot be seen (another user's process)."""
    try:
        connections = proc.net_connections(kind="tcp")
    except (psutil.AccessDenied, psutil.ZombieProcess):
        return None
    except psutil.NoSuchProcess:
        return False
    return any(c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port for c in connections)


def is_forkserver(proc: psutil.Process) -> bool:
    with contextlib.suppress(psutil.Error):
        return "multiprocessing.forkserver" in " ".join(proc.cmdline())
    return False


def api_process_of(worker: psutil.Process) -> psutil.Process | None:
    """The API process a worker belongs to: its parent, or its grandparent when the parent is the forkserver."""
    try:
        parent = worker.parent()
        if parent is not None and is_forkserver(parent):
            parent = parent.parent()
    except psutil.Error:
        return None
    return parent
