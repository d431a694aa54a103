"""Peak memory of one call, for the benches (``bench/run_all.py``).

* CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus the memory
  allocated before the call: the peak of tensors the call added (PyTorch's caching allocator).
* CPU (Linux only): the peak resident set size of the process during the call, minus the resident
  size before it. Before the call, freed heap memory is handed back to the system
  (glibc ``malloc_trim(0)``) and the kernel's peak counter is reset (``echo 5 > /proc/self/clear_refs``
  resets ``VmHWM`` to the current ``VmRSS``); after it, ``VmHWM`` of ``/proc/self/status`` is the peak.
  This counts everything the call touched (tensors, allocator slack, libraries' buffers), not only
  tensors; memory the allocator kept from earlier calls and reuses is not counted again, so it is a
  lower bound when the same process did similar work before. Not ``resource.ru_maxrss`` (it cannot be
  reset) and not ``tracemalloc`` (it does not see PyTorch's allocations).

Elsewhere (macOS, Windows) CPU peaks are not measured: :func:`peak_memory_meter` says so in its method
text and the meter returns None.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
from typing import Callable, Optional, Tuple

MIB = 2 ** 20
_STATUS = '/proc/self/status'
_CLEAR_REFS = '/proc/self/clear_refs'


def _status_kib(field: str) -> int:
    with open(_STATUS) as f:
        for line in f:
            if line.startswith(field + ':'):
                return int(line.split()[1])
    raise RuntimeError(f"{_STATUS} has no {field} line")


def _linux_peak_reset_available() -> bool:
    return os.path.isfile(_STATUS) and os.access(_CLEAR_REFS, os.W_OK)


def _malloc_trim() -> Optional[Callable[[], None]]:
    """glibc's ``malloc_trim(0)``, or None for another C library."""
    name = ctypes.util.find_library('c')
    trim = getattr(ctypes.CDLL(name), 'malloc_trim', None) if name else None
    return None if trim is None else (lambda: trim(0))


def peak_memory_meter(device) -> Tuple[Optional[Callable[[Callable[[], object]], Optional[float]]], str]:
    """``(meter, method)``: ``meter(call)`` runs ``call()`` and returns its peak memory increase in MiB
    (None where it cannot be measured; then ``meter`` is None), ``method`` says how it was measured."""
    import torch
    if device.type == 'cuda':
        def cuda_meter(call):
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
            call()
            torch.cuda.synchronize(device)
            return (torch.cuda.max_memory_allocated(device) - before) / MIB
        return cuda_meter, ('CUDA: torch.cuda.max_memory_allocated() after reset_peak_memory_stats(), minus '
                            'memory_allocated() before the call (tensors only)')
    if device.type != 'cpu':
        return None, f'not measured on device {device.type}'
    if not _linux_peak_reset_available():
        return None, 'not measured: CPU peaks need Linux (/proc/self/clear_refs and /proc/self/status)'
    trim = _malloc_trim()

    def cpu_meter(call):
        gc.collect()
        if trim is not None:
            trim()
        with open(_CLEAR_REFS, 'w') as f:
            f.write('5')
        before = _status_kib('VmRSS')
        call()
        return (_status_kib('VmHWM') - before) / 1024
    trimming = 'glibc malloc_trim(0), then ' if trim is not None else 'no malloc_trim (not glibc), '
    return cpu_meter, (f'CPU: peak resident set size during the call minus the resident size before it (Linux: '
                       f'{trimming}/proc/self/clear_refs resets VmHWM; VmHWM after the call); counts all memory '
                       f'the call touched, a lower bound where it reuses memory freed earlier')
