"""Worker for test_godc_ddp.py: one rank of a 2-process gloo group computing GODC on its share of
the batch (imported by the spawned processes, hence a module of its own)."""
import torch.distributed as dist

from nnunet_ext.losses import GODCLoss


def worker(rank, world_size, init_file, x, y, splits, ddp, results):
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=world_size)
    try:
        start = sum(splits[:rank])
        local_x = x[start:start + splits[rank]].clone().requires_grad_(True)
        loss = GODCLoss(ddp=ddp)(local_x, y[start:start + splits[rank]])
        loss.backward()
        results[rank] = (loss.detach(), local_x.grad)
    finally:
        dist.destroy_process_group()
