"""GODC under torch.distributed (2 CPU processes, gloo): with ``ddp=True`` the unions are
normalised by the mean over the global batch, also when ranks hold different numbers of samples."""
import torch
import torch.multiprocessing as mp

from ddp_godc_worker import worker


def oracle(x, y, rank_slice, union_mean):
    """Naive per-sample loop: mean over the rank's samples of (1 - DC_b) * U_b / union_mean."""
    terms = []
    for b in range(*rank_slice):
        p, g = x[b, 0], y[b, 0]
        dice = (2 * (p * g).sum() + 1e-5) / (p.sum() + g.sum() + 1e-5)
        union = (p + g - p * g).sum().item()
        terms.append((1 - dice) * union / union_mean)
    return sum(terms) / len(terms)


def test_ddp_normalises_by_the_global_batch(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 1, 12, 12, generator=g, dtype=torch.float64)
    y = torch.zeros(4, 1, 12, 12, dtype=torch.float64)
    for b, size in enumerate([2, 5, 8, 11]):  # objects of very different sizes
        y[b, 0, :size, :size] = 1
    splits = [1, 3]
    unions = [(x[b] + y[b] - x[b] * y[b]).sum().item() for b in range(4)]
    for ddp in (True, False):
        results = mp.Manager().dict()
        mp.spawn(worker, args=(2, str(tmp_path / f'init_{ddp}'), x, y, splits, ddp, results), nprocs=2, join=True)
        for rank, (start, stop) in enumerate([(0, 1), (1, 4)]):
            mean = sum(unions) / 4 if ddp else sum(unions[start:stop]) / (stop - start)
            xr = x.clone().requires_grad_(True)
            expected = oracle(xr, y, (start, stop), mean)
            expected.backward()
            loss, grad = results[rank]
            torch.testing.assert_close(loss, expected.detach())
            torch.testing.assert_close(grad, xr.grad[start:stop])
