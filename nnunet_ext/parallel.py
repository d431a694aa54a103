"""Running one function per case (conversion, evaluation, view fusion) in worker processes, with a progress bar;
stopping the workers at once on an interrupt; keeping signals out of a short critical section.

Interrupts (``docs/commands/convert.md``, "Errors"): the ``nnunet-ext`` command turns SIGTERM into
``cli.Interrupted``, a ``KeyboardInterrupt``, so SIGINT (Ctrl-C) and SIGTERM both reach :func:`run_cases` as a
``KeyboardInterrupt``. The workers ignore SIGINT (a Ctrl-C in a terminal goes to every process of the group:
they would each print a traceback), and the parent terminates them, running or idle, before the exception
goes on to the caller's clean-up: no worker outlives the command or writes into a folder being removed.
"""
from __future__ import annotations

import concurrent.futures as cf
import contextlib
import multiprocessing
import signal
import threading
from typing import Any, Callable, Dict, Iterator, List, Sequence, Tuple

from tqdm import tqdm

#: signals that end a command (``cli.main`` raises on them), held back by :func:`signals_deferred`
INTERRUPTING_SIGNALS = tuple(getattr(signal, name) for name in ('SIGINT', 'SIGTERM') if hasattr(signal, name))


def ignore_sigint() -> None:
    """Worker initializer: Ctrl-C is the parent's to handle (it terminates the workers)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Holds SIGINT and SIGTERM back (blocked, not lost) while the block runs, for a step that must not stop
    half-way (moving a dataset into place, removing a temporary folder); the handler runs right after it.
    A no-op outside the main thread or where ``pthread_sigmask`` does not exist (Windows)."""
    if not hasattr(signal, 'pthread_sigmask') or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, INTERRUPTING_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _terminate_workers(pool: cf.ProcessPoolExecutor, known: Dict[int, Any]) -> None:
    """Cancels the pending cases and terminates every worker of ``pool`` (SIGTERM, SIGKILL after 5 s)."""
    with signals_deferred():
        processes = {**known, **dict(getattr(pool, '_processes', None) or {})}
        manager = getattr(pool, '_executor_manager_thread', None)
        pool.shutdown(wait=False, cancel_futures=True)
        for process in processes.values():
            if process.is_alive():
                process.terminate()
        for process in processes.values():
            process.join(5)
            if process.is_alive():
                process.kill()
                process.join()
        if manager is not None:  # it sees the workers gone, fails what was left and ends
            manager.join(10)


def run_cases(function: Callable[..., Any], jobs: Sequence[Tuple], num_processes: int, description: str,
              progress: bool = True) -> List[Any]:
    """``[function(*job) for job in jobs]`` in ``num_processes`` spawned workers (inline for 1), in the
    order of ``jobs``. The first error is re-raised after the running cases ended and the pending ones
    were cancelled, so the caller can clean up without a worker still writing. An interrupt
    (``KeyboardInterrupt``: Ctrl-C, or SIGTERM under ``nnunet-ext``) does not wait for the running cases: the
    workers are terminated, then it is re-raised."""
    if num_processes < 1:
        raise ValueError(f"-np must be >= 1, got {num_processes}")
    if num_processes == 1 or len(jobs) <= 1:
        return [function(*job) for job in tqdm(jobs, desc=description, unit='case', disable=not progress)]
    results: List[Any] = [None] * len(jobs)
    pool = cf.ProcessPoolExecutor(max_workers=num_processes, mp_context=multiprocessing.get_context('spawn'),
                                  initializer=ignore_sigint)
    known: Dict[int, Any] = {}
    try:
        futures = {pool.submit(function, *job): i for i, job in enumerate(jobs)}
        known.update(getattr(pool, '_processes', None) or {})  # the workers start in submit, in this thread
        for future in tqdm(cf.as_completed(futures), total=len(futures), desc=description, unit='case',
                           disable=not progress):
            results[futures[future]] = future.result()
        pool.shutdown(wait=True)
    except KeyboardInterrupt:
        _terminate_workers(pool, known)
        raise
    except BaseException:
        try:
            pool.shutdown(wait=True, cancel_futures=True)
        except KeyboardInterrupt:  # interrupted while the running cases end
            _terminate_workers(pool, known)
            raise
        raise
    return results
