"""Class sums across ``torch.distributed`` ranks."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def all_reduce_class_sums(sums: Tensor, counts: Tensor) -> tuple[Tensor, Tensor]:
    """Sums per-class sums and counts over all ranks when a process group is
    initialized (so N ranks see the centroids of the concatenated batch);
    returns them unchanged otherwise."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return sums, counts
    if torch.compiler.is_compiling():
        raise RuntimeError("distributed centroid reduction is not supported under torch.compile")
    packed = torch.cat([sums.double().flatten(), counts.double()])
    dist.all_reduce(packed)
    k, c = sums.shape
    return packed[: k * c].view(k, c).to(sums.dtype), packed[k * c :].round().to(counts.dtype)
