"""One trap for host-device synchronisation, shared by the GPU-readiness tests: inside
:func:`trap_host_device_sync`, every call that makes a CUDA host wait for the device (or copies a Python
value to it per call) raises :class:`HostDeviceSync`."""
from __future__ import annotations

import contextlib

import torch

#: Tensor methods that read a value on the host, or produce a data-dependent size.
TRAPPED_METHODS = ('__bool__', 'item', 'tolist', '__int__', '__float__', '__index__', 'nonzero', 'unique')
#: torch functions that copy host data to the device (``tensor``, ``as_tensor``) or have data-dependent sizes.
TRAPPED_FUNCTIONS = ('tensor', 'as_tensor', 'nonzero', 'unique', 'argwhere', 'masked_select')


class HostDeviceSync(AssertionError):
    pass


@contextlib.contextmanager
def trap_host_device_sync():
    """Raises :class:`HostDeviceSync` on ``bool(tensor)``, ``.item()``, ``.tolist()``, ``int()``/``float()``/
    index use of a tensor, ``nonzero``/``unique``/``argwhere``/``masked_select`` and ``torch.tensor``/
    ``torch.as_tensor`` while the block runs; restores everything after it."""
    def trap(what):
        def raiser(*args, **kwargs):
            raise HostDeviceSync(f'{what} in a forward, loss or backward waits for the device')
        return raiser

    patches = [(torch.Tensor, name) for name in TRAPPED_METHODS] + [(torch, name) for name in TRAPPED_FUNCTIONS]
    saved = [(owner, name, getattr(owner, name)) for owner, name in patches]
    try:
        for owner, name in patches:
            setattr(owner, name, trap(f'{owner.__name__}.{name}'))
        yield
    finally:
        for owner, name, original in saved:
            setattr(owner, name, original)
