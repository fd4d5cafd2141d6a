"""What a TIGER checkpoint holds, and the original tool's checkpoint_epoch_*.pt made from it.

A Ray Train checkpoint is a directory with one file, ``tiger_state.pt``: model (parameters and
the EMA/codebook buffers), optimizer, and the loop state (epoch, global step, history,
early-stopping state). Only tensors, numbers, strings, lists and dicts, so it loads with
``torch.load(weights_only=True)``. Batch order, Gumbel noise and restart draws are functions of
(seed, epoch), so nothing else is needed to continue exactly where the run stopped.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from semid_dist.tokenizer import FORMAT

STATE_FILE = "tiger_state.pt"


@dataclass
class LoopState:
    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps completed (global: the same on every rank)
    history: list = field(default_factory=list)  # one dict per completed epoch
    best_val: float = math.inf
    bad_epochs: int = 0  # epochs since the validation recon last improved
    stopped_early: bool = False
    usage_LK: list = field(default_factory=list)  # code counts per level, last evaluation
    kept_epoch: int = 0  # the evaluation epoch --keep_model best keeps (0: none yet)
    kept_score: list = field(default_factory=list)  # its steps.model_score

    def to_dict(self) -> dict:
        return asdict(self)


def save(
    directory: str,
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    state: LoopState,
    model_args: dict,
    config: dict,
    kept_model: dict | None = None,
) -> str:
    """kept_model: the state dict of the epoch --keep_model best keeps, so a resumed run keeps
    the same choice."""
    path = os.path.join(directory, STATE_FILE)
    torch.save(
        {
            "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "kept_model": kept_model or {},
            "optimizer": opt.state_dict(),
            "loop": state.to_dict(),
            "model_args": model_args,
            "config": config,
        },
        path,
    )
    return path


def load(directory: str) -> dict[str, Any]:
    return torch.load(os.path.join(directory, STATE_FILE), map_location="cpu", weights_only=True)


def loop_state(saved: dict[str, Any]) -> LoopState:
    return LoopState(**saved["loop"])


def original_tool_payload(saved: dict[str, Any]) -> dict[str, Any]:
    """checkpoint_epoch_N.pt: a complete tokenizer (load_tokenizer reads it like final_model.pt)
    plus the epoch and its metrics. The optimizer state stays in the Ray Train checkpoint."""
    loop = saved["loop"]
    return {
        "format": FORMAT,
        "mode": "tiger",
        "config": saved["config"],
        "model_args": saved["model_args"],
        "state_dict": saved["model"],
        "epoch": loop["epoch"],
        "metrics": loop["history"][-1] if loop["history"] else {},
    }
