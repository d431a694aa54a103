"""ANU-Net's hybrid loss under torch.distributed (2 CPU processes, gloo, the model wrapped in
DistributedDataParallel as nnU-Net wraps its network): with ``ddp=True`` and ``batch_dice`` a step on
two ranks has the gradients of one process on the concatenated batch (the batch Dice's sums and the
focal-BCE normaliser are global), also with unequal per-rank batches and the ignore label; with
``ddp=False`` each rank's batch Dice is its own and the gradients differ."""
import torch
import torch.multiprocessing as mp

from ddp_hybrid_worker import make_loss, make_model, worker


def test_batch_dice_is_global_under_ddp(tmp_path):
    gen = torch.Generator().manual_seed(0)
    data = torch.randn(4, 2, 10, 12, generator=gen, dtype=torch.float64)
    labels = torch.zeros(4, 1, 10, 12, dtype=torch.float64)
    labels[0, 0, 2:5, 3:9] = 1  # objects of different sizes and classes, one sample without foreground
    labels[1, 0, :, :6] = 2
    labels[1, 0, 4:6, 8:10] = 1
    labels[3, 0, 1:9, 1:11] = 1
    with_ignore = labels.clone()
    with_ignore[:, :, 0, :] = 3  # nnU-Net's ignore label on the first row
    weight = 0.5 * torch.randn(3, 2, 1, 1, generator=gen, dtype=torch.float64)
    bias = 0.1 * torch.randn(3, generator=gen, dtype=torch.float64)
    cases = [(labels, [2, 2], True, None), (labels, [1, 3], True, None), (with_ignore, [1, 3], True, 3),
             (labels, [2, 2], False, None)]
    results = mp.Manager().dict()
    mp.spawn(worker, args=(2, str(tmp_path / 'init'), [(data, y, s, d, i, weight, bias) for y, s, d, i in cases],
                           results), nprocs=2, join=True)
    for k, (y, splits, ddp, ignore_label) in enumerate(cases):
        model = make_model(weight, bias)
        single = make_loss(ddp, ignore_label)(model(data), y)  # no process group here: one process, whole batch
        single.backward()
        (loss0, gw0, gb0), (loss1, gw1, gb1) = results[0][k], results[1][k]
        torch.testing.assert_close(gw0, gw1)  # DDP averaged the gradients
        torch.testing.assert_close(gb0, gb1)
        if ddp:
            torch.testing.assert_close(gw0, model.weight.grad)
            torch.testing.assert_close(gb0, model.bias.grad)
            torch.testing.assert_close((loss0 + loss1) / 2, single.detach())  # nnU-Net logs the ranks' mean
        else:
            assert (gw0 - model.weight.grad).abs().max() > 1e-4
