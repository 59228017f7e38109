"""Sums across ``torch.distributed`` ranks."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def is_distributed() -> bool:
    """True when a process group of more than one rank is initialized."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(*tensors: Tensor) -> tuple[Tensor, ...]:
    """Sums each tensor over all ranks when a process group is initialized (so
    N ranks see the statistics of the concatenated data); returns them
    unchanged otherwise. Reduced in float64, returned in each input's dtype.
    Integer tensors must hold values that float64 represents exactly."""
    if not is_distributed():
        return tensors
    if torch.compiler.is_compiling():
        raise RuntimeError("distributed class sums are not supported under torch.compile")
    packed = torch.cat([t.detach().double().flatten() for t in tensors])
    dist.all_reduce(packed)
    out, at = [], 0
    for t in tensors:
        chunk = packed[at : at + t.numel()].view(t.shape)
        out.append(chunk.round().to(t.dtype) if not t.is_floating_point() else chunk.to(t.dtype))
        at += t.numel()
    return tuple(out)
