"""The random number generators' state, captured into a checkpoint and restored on --resume, so that a
resumed run draws the dropout masks and batch orders the uninterrupted one would have."""

from __future__ import annotations

import torch

from lmtrain.training.distributed import World


def captured(device: torch.device, world: World) -> dict:
    """This process's RNG state: torch's CPU generator and, on CUDA, its GPU's (all GPUs' in one process)."""
    if device.type != "cuda":
        cuda = []
    elif world.distributed:  # each process draws on its own GPU
        cuda = [torch.cuda.get_rng_state(device)]
    else:
        cuda = torch.cuda.get_rng_state_all()
    return {"torch": torch.get_rng_state(), "cuda": cuda}


def restore(payload: dict, device: torch.device, world: World) -> None:
    """Each process's own RNG state from a checkpoint; with another number of processes than saved,
    process 0's for all (exact only without dropout)."""
    by_rank = payload.get("rng_by_rank", [])
    rng = by_rank[world.rank] if len(by_rank) == world.size else payload["rng"]
    torch.set_rng_state(rng["torch"])
    if device.type == "cuda" and rng.get("cuda"):
        if world.distributed:
            torch.cuda.set_rng_state(rng["cuda"][0], device)
        else:
            torch.cuda.set_rng_state_all(rng["cuda"])
