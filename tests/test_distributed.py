"""Two gloo ranks on the CPU give the same centroids, losses, gradients and
metrics as one process on the concatenated data."""

import pathlib

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import DataLoader, TensorDataset

import mcmi_torch
from mcmi_torch.metrics import teacher_report

WORLD = 2


def make_data():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(64, 6, generator=g)
    y = torch.randint(0, 5, (64,), generator=g)
    model = torch.nn.Linear(6, 5)
    with torch.no_grad():
        model.weight.copy_(torch.randn(5, 6, generator=g))
        model.bias.zero_()
    return x, y, model


def compute(x, y, model):
    """Everything that must agree: centroids, report, and for each mode the
    loss, the weight gradient and the EMA buffer after one step."""
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    out = {"centroids": mcmi_torch.estimate_centroids(model, loader, 5, progress=False)}
    report = teacher_report(model, loader, 5, progress=False)
    out["report"] = torch.tensor([report.accuracy, report.cmi, report.separation])
    for mode in ("batch", "ema"):
        crit = mcmi_torch.MCMILoss(0.4, mode, num_classes=5)
        model.zero_grad()
        loss = crit(model(x), y)
        loss.backward()
        out[f"{mode}/loss"] = loss.detach()
        out[f"{mode}/grad"] = model.weight.grad.clone()
        if mode == "ema":
            out["ema/centroids"] = crit.centroids.clone()
    return out


def worker(rank, store_path, result_path):
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=WORLD)
    try:
        x, y, model = make_data()
        shard = slice(rank * 32, (rank + 1) * 32)
        out = compute(x[shard], y[shard], model)
        # What DDP does to losses and gradients: average them over ranks.
        for key in ("batch/loss", "batch/grad", "ema/loss", "ema/grad"):
            dist.all_reduce(out[key])
            out[key] /= WORLD
        if rank == 0:
            torch.save(out, result_path)
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch built without distributed")
def test_two_ranks_match_one_process(tmp_path: pathlib.Path):
    result = tmp_path / "rank0.pt"
    mp.spawn(worker, args=(str(tmp_path / "store"), str(result)), nprocs=WORLD, join=True)
    ranks = torch.load(result, weights_only=True)
    x, y, model = make_data()
    single = compute(x, y, model)
    assert set(ranks) == set(single)
    for key, want in single.items():
        torch.testing.assert_close(ranks[key], want, rtol=1e-5, atol=1e-6, msg=key)
