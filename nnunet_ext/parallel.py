"""Running one function per case (conversion, evaluation, view fusion) in worker processes, with a progress bar."""
from __future__ import annotations

import concurrent.futures as cf
import multiprocessing
from typing import Any, Callable, List, Sequence, Tuple

from tqdm import tqdm


def run_cases(function: Callable[..., Any], jobs: Sequence[Tuple], num_processes: int, description: str,
              progress: bool = True) -> List[Any]:
    """``[function(*job) for job in jobs]`` in ``num_processes`` spawned workers (inline for 1), in the
    order of ``jobs``. The first error is re-raised after the running cases ended and the pending ones
    were cancelled, so the caller can clean up without a worker still writing."""
    if num_processes < 1:
        raise ValueError(f"-np must be >= 1, got {num_processes}")
    if num_processes == 1 or len(jobs) <= 1:
        return [function(*job) for job in tqdm(jobs, desc=description, unit='case', disable=not progress)]
    results: List[Any] = [None] * len(jobs)
    with cf.ProcessPoolExecutor(max_workers=num_processes, mp_context=multiprocessing.get_context('spawn')) as pool:
        futures = {pool.submit(function, *job): i for i, job in enumerate(jobs)}
        try:
            for future in tqdm(cf.as_completed(futures), total=len(futures), desc=description, unit='case',
                               disable=not progress):
                results[futures[future]] = future.result()
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise
    return results
