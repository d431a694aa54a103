"""One rank of the two-process DDP check in ``test_gpu_readiness.py`` (spawned: a module of its own)."""
from __future__ import annotations

import copy
import os
import traceback
import warnings

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import trainer_helpers as h

STEPS = 3
BATCH = 4  # global batch, split over the ranks


def worker(rank: int, world_size: int, init_file: str, configuration: str, names, environ: dict, results) -> None:
    os.environ.update(environ)
    warnings.filterwarnings('ignore')
    torch.set_num_threads(1)
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=world_size)
    try:
        for name in names:
            try:
                results[(rank, name)] = run_trainer(rank, world_size, name, configuration)
            except Exception:  # reported by the test, with the trainer's name; the other trainers still run
                results[(rank, name)] = {'error': traceback.format_exc()}
            dist.barrier()
    finally:
        dist.destroy_process_group()


def run_trainer(rank: int, world_size: int, name: str, configuration: str) -> dict:
    """Three SGD steps of ``DDP(compile(network, fullgraph=True), find_unused_parameters=False)`` with the
    trainer's own loss as nnU-Net builds it on CUDA (``is_ddp`` is true: the group is up)."""
    torch.manual_seed(0)
    trainer, network, loss = h.build(name, configuration, compile_network=False)
    assert trainer.is_ddp
    initial = copy.deepcopy(network.state_dict())
    network = torch.nn.SyncBatchNorm.convert_sync_batchnorm(network) if torch.cuda.is_available() else network
    model = DDP(h.aot_eager_compile(network, fullgraph=True), find_unused_parameters=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    out = {'missing': [], 'losses': []}
    for step in range(STEPS):
        batch = h.make_batch(trainer, BATCH, seed=step)
        optimizer.zero_grad(set_to_none=True)
        value = h.forward_loss(model, loss, h.split_batch(batch, rank, world_size))
        value.backward()
        out['missing'].append(h.parameters_without_gradient(model.module))
        out['losses'].append(float(value.detach()))
        if step == 0:
            out['initial'] = initial
            out['batch'] = batch
            out['grads'] = {n.removeprefix('_orig_mod.'): p.grad.detach().clone()
                            for n, p in model.module.named_parameters() if p.grad is not None}
        optimizer.step()
    return out
