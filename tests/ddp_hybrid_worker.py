"""Worker for test_hybrid_ddp.py: one rank of a 2-process gloo group training a 1x1 convolution wrapped
in DistributedDataParallel (as nnU-Net wraps its network) with ANU-Net's hybrid loss on its share of the
batch (imported by the spawned processes, hence a module of its own)."""
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from nnunet_ext.losses.hybrid import HybridLoss, NNUNetTargetHybridLoss


def make_model(weight, bias):
    model = nn.Conv2d(weight.shape[1], weight.shape[0], 1).double()
    with torch.no_grad():
        model.weight.copy_(weight)
        model.bias.copy_(bias)
    return model


def make_loss(ddp, ignore_label):
    hybrid = HybridLoss('softmax', batch_dice=True, ddp=ddp)
    return NNUNetTargetHybridLoss(hybrid, ignore_label=ignore_label)


def worker(rank, world_size, init_file, cases, results):
    """``cases``: list of (data, labels, splits, ddp, ignore_label, weight, bias); ``results[rank]``: per case,
    (loss value, weight gradient, bias gradient) after DDP's gradient averaging."""
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=world_size)
    try:
        out = []
        for data, labels, splits, ddp, ignore_label, weight, bias in cases:
            start = sum(splits[:rank])
            model = DDP(make_model(weight, bias))
            loss = make_loss(ddp, ignore_label)(model(data[start:start + splits[rank]]),
                                                labels[start:start + splits[rank]])
            loss.backward()
            out.append((loss.detach(), model.module.weight.grad.clone(), model.module.bias.grad.clone()))
        results[rank] = out
    finally:
        dist.destroy_process_group()
