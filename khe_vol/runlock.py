"""One run at a time per results folder.

Snakemake's own lock lives in the working directory's ``.snakemake/``, so two
runs started from different directories with the same ``results_dir`` would
both write it. The workflow therefore holds an exclusive ``flock`` on
``<results_dir>/.khe-vol.lock`` from ``onstart`` for the life of the Snakemake
process (dry runs, ``--report`` and jobs run inside SLURM allocations never
take it). The kernel releases a ``flock`` when its process ends, even when it
is killed, so a lock is never left stale and nothing needs removing by hand.

While a run holds the lock, the file names it (process id, host, working
directory); the text is cleared when the run ends, so finished runs leave the
same bytes behind.
"""

from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path

LOCK_NAME = ".khe-vol.lock"


class ResultsFolderBusy(RuntimeError):
    """Another process holds the results folder's lock; the message says which and what to do."""


def lock_results_dir(results_dir):
    """Take the results folder's lock for this process, or say who holds it.

    Parameters
    ----------
    results_dir : path-like
        The run's ``results_dir`` (created if missing).

    Returns
    -------
    file object
        The open lock file. The lock lasts as long as it stays open: keep a
        reference for the run's life (:func:`release_results_dir` ends it).

    Raises
    ------
    ResultsFolderBusy
        Naming the folder, the holder and how to proceed.
    OSError
        If the folder or the lock file cannot be created.
    """
    folder = Path(results_dir).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    handle = open(folder / LOCK_NAME, "a+", encoding="utf-8")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "a process that has not yet written its name"
        handle.close()
        raise ResultsFolderBusy(
            f"results folder {folder} is in use by another khe-vol run ({holder}); two runs writing one "
            "results folder would mix their outputs. Wait until that run ends (the lock is released when its "
            "Snakemake process ends, also if it is killed; nothing needs removing by hand), or give this run "
            "another results_dir in its config."
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {socket.gethostname()}, started in {os.getcwd()}\n")
    handle.flush()
    return handle


def release_results_dir(handle):
    """Clear the holder's name and release the lock taken by :func:`lock_results_dir`."""
    handle.seek(0)
    handle.truncate()
    handle.flush()
    fcntl.flock(handle, fcntl.LOCK_UN)
    handle.close()
