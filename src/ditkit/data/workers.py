"""DataLoader worker processes that leave SIGTERM and SIGINT to the training process.

A scheduler that pre-empts a job (SLURM, Kubernetes, most others) sends SIGTERM to every process of the job,
the DataLoader workers included. A worker killed that way makes PyTorch's loader raise "DataLoader worker is
killed by signal" inside the trainer, which then dies before it can write its checkpoint. So workers ignore
the stop signals and the trainer alone decides: it finishes its step, writes a checkpoint and shuts the
workers down itself. The signals stay blocked while workers start, so that one arriving between a worker's
birth and its `worker_init_fn` is dropped instead of killing it.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def ignore_stop_signals(worker_id: int) -> None:
    """`worker_init_fn` for DataLoaders: this worker ignores SIGTERM/SIGINT (its parent handles them)."""
    del worker_id
    for sig in STOP_SIGNALS:
        # Ignoring a signal also discards one that is pending, so unblocking afterwards delivers nothing.
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


@contextmanager
def stop_signals_held() -> Iterator[None]:
    """Hold SIGTERM/SIGINT pending in this thread (and in processes and threads started from it) for the
    duration; a signal that arrived meanwhile is delivered to this process when the block ends."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
