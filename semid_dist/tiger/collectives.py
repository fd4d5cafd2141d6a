"""The three collectives the TIGER loop needs, over torch.distributed (gloo on CPU, NCCL on GPU).

With one process (or no process group) every operation is the identity, so the training code
has a single path for 1 and N workers.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class Collectives:
    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        self.rank = dist.get_rank() if self.distributed else 0
        self.world = dist.get_world_size() if self.distributed else 1
        self.device = torch.device(device)

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        """all_reduce(SUM) in place; returns t."""
        if self.distributed:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def broadcast0_(self, t: torch.Tensor) -> torch.Tensor:
        """Rank 0's values overwrite every rank's, in place; returns t."""
        if self.distributed:
            dist.broadcast(t, src=0)
        return t

    def sum_numbers(self, values: list[float]) -> list[float]:
        """Sum a few Python numbers over ranks (float64, one collective)."""
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        return self.sum_(t).tolist()

    def gather_rows(self, t_NC: torch.Tensor) -> torch.Tensor:
        """Every rank's rows, concatenated in rank order, on every rank (sizes may differ)."""
        if not self.distributed:
            return t_NC
        n = torch.tensor([t_NC.shape[0]], dtype=torch.int64, device=t_NC.device)
        sizes = [torch.zeros_like(n) for _ in range(self.world)]
        dist.all_gather(sizes, n)
        sizes_W = [int(s.item()) for s in sizes]
        most = max(sizes_W)
        padded = t_NC.new_zeros((most,) + tuple(t_NC.shape[1:]))
        padded[: t_NC.shape[0]] = t_NC
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(parts, padded.contiguous())
        return torch.cat([p[:s] for p, s in zip(parts, sizes_W, strict=True)])
