"""What a run's checkpoint holds, and what `--resume` checks before it goes on from one.

A checkpoint is self-contained: config, tokenizer, weights, optimizer state, progress, every process's
RNG state, the carried stream states and the corpus's fingerprints. A resume refuses a config that would
learn something else than the run did (only the keys of RESUMABLE may change) and a corpus that changed
since, unless asked to go on (`--allow-changed-data`)."""

from __future__ import annotations

import shlex
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from lmtrain.config import Config, TrainConfig, differences, from_dict, get_value, to_dict, unused_keys
from lmtrain.data.cache import changed_files
from lmtrain.errors import LmtrainError
from lmtrain.training import rng
from lmtrain.training.distributed import World, gather_objects, gather_rows, own_rows
from lmtrain.training.rundir import RunDirectory

# Keys a resumed run may change: how long to go on, how to report, and where and in what precision the
# products run (a run started with bfloat16 may go on where there is no AVX-512 BF16), not what is learned.
RESUMABLE = ("train.max_steps", "train.max_epochs", "train.max_seconds", "train.eval_every", "train.log_every",
             "train.checkpoint_every", "train.keep_last", "train.max_bad_steps", "train.final_samples",
             "train.sample_every", "train.tensorboard", "train.device", "train.threads", "train.precision",
             "train.out_dir", "data.cache")
# Keys that only decide how the weights start: a resumed run has its weights, and keeps the values it
# started with (a run started before `model.init: auto` was the default goes on with its own).
INITIAL_ONLY = ("model.init", "model.forget_bias")


@dataclass
class Progress:
    step: int = 0                        # optimizer steps taken
    epoch: int = 0                       # current epoch, 0-based
    batch_index: int = 0                 # batches of the current epoch already trained on
    best_valid_loss: float | None = None
    train_seconds: float = 0.0           # time in training steps (what max_seconds limits)
    elapsed_seconds: float = 0.0         # wall-clock time, evaluation and saving included
    tokens: int = 0                      # target tokens trained on

    def stop_reason(self, config: TrainConfig) -> str | None:
        """The limit of `train.*` that the run has reached (the first of max_steps, max_epochs and
        max_seconds), or None."""
        if config.max_steps is not None and self.step >= config.max_steps:
            return "max_steps"
        if config.max_epochs is not None and self.epoch >= config.max_epochs:
            return "max_epochs"
        if config.max_seconds is not None and self.train_seconds >= config.max_seconds:
            return "max_seconds"
        return None

    @classmethod
    def from_checkpoint(cls, saved: dict) -> Progress:
        known = {field.name for field in fields(cls)}
        return cls(**{key: value for key, value in saved.items() if key in known})


def fresh_start(run_dir: RunDirectory) -> tuple[None, None]:
    """No checkpoint to resume from: never overwrite a run's checkpoints by starting again in its folder."""
    run_dir.check_fresh()
    return None, None


def resume_payload(run_dir: RunDirectory, config: Config, data_files: dict, *, allow_changed_data: bool,
                   warn: Callable[[str], None]) -> tuple[str, dict]:
    """The newest intact checkpoint of the folder: (path, payload), plain values to hand to the other
    processes, once `checked_resume` accepted it (and set `config`'s initialisation keys to the run's).
    The folder's lock is taken first: a run still writing it refuses this one before anything is read."""
    if run_dir.path.is_dir():
        run_dir.lock()
    path, payload, notes = run_dir.newest_intact()
    for note in notes:
        warn(note)
    checked_resume(payload, config, data_files, allow_changed_data=allow_changed_data, warn=warn)
    return str(path), payload


def restore(payload: dict, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer, world: World,
            device: torch.device) -> tuple[Progress, list]:
    """Weights, optimizer and RNG state as the checkpoint left them; returns its progress and this
    process's rows of the carried states (saved for the global batch), one per LM."""
    model.load_state_dict(payload["model"])
    optimizer.load_state_dict(payload["optimizer"])
    check_optimizer_state(optimizer)
    states = [own_rows(world, [tuple(t.to(device) for t in layer) for layer in saved]) if saved else None
              for saved in payload["stream_states"]]
    rng.restore(payload, device, world)
    return Progress.from_checkpoint(payload["progress"]), states


def check_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Refuse optimizer state whose tensors are not shaped like their parameters: torch's load_state_dict
    does not check, and the fused optimizer step would read and write past them."""
    for group in optimizer.param_groups:
        for index, parameter in enumerate(group["params"]):
            for name, value in optimizer.state.get(parameter, {}).items():
                if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape != parameter.shape:
                    raise LmtrainError(f"--resume: the checkpoint's optimizer state does not fit the model: {name} "
                                       f"of parameter {index} is {tuple(value.shape)}, the parameter "
                                       f"{tuple(parameter.shape)}; the checkpoint is damaged")


def resume_command(out_dir: Path, world: World) -> str:
    """The command that continues a stopped run (with its number of processes, when they ran on one machine)."""
    command = f"lmtrain train {shlex.quote(str(out_dir / 'config.yaml'))} --resume"  # to paste into a shell
    one_machine = world.distributed and world.local_size == world.size
    return command + (f" --nproc {world.size}" if one_machine else "")


def checked_resume(payload: dict, config: Config, data_files: dict, *, allow_changed_data: bool,
                   warn: Callable[[str], None]) -> Config:
    """`config` as the resumed run goes on with it (the run's own initialisation keys), after refusing a
    config that differs in what is learned and a corpus that changed since the checkpoint."""
    saved = from_dict(payload["config"])
    unused_by_both = tuple(unused_keys(saved).keys() & unused_keys(config).keys())  # read by neither run
    changed = differences(saved, config, ignore=RESUMABLE + INITIAL_ONLY + unused_by_both)
    if changed:
        raise LmtrainError("--resume: the config differs from the run's in " + ", ".join(
            f"{key} ({get_value(saved, key)!r} -> {get_value(config, key)!r})" for key in changed))
    config.model.init, config.model.forget_bias = saved.model.init, saved.model.forget_bias
    changes = changed_files(payload.get("data_files", data_files), data_files)
    if changes and not allow_changed_data:
        raise LmtrainError("--resume: the corpus changed since the run's checkpoint: " + "; ".join(changes)
                           + ": it would go on training, and choose best.pt, on other data; "
                             "--allow-changed-data continues on purpose")
    if changes:
        warn("warning: the corpus changed since the run's checkpoint (" + "; ".join(changes)
             + "); continuing on it, as --allow-changed-data asks")
    return config


def checkpoint_payload(*, config: Config, tokenizer, model, optimizer, progress: Progress, data_files: dict,
                       states: list, world: World, device: torch.device) -> dict:
    """The checkpoint's contents. Every process must call this at the same step: the carried states
    (`states`, one per LM) are gathered for the global batch, whatever the number of processes, and
    every process's RNG state with them."""
    stream_states = [gather_rows(world, state) for state in states]
    rng_by_rank = gather_objects(world, rng.captured(device, world))
    payload = {
        "config": to_dict(config), "tokenizer": tokenizer.to_dict(), "model": model.state_dict(),
        "optimizer": optimizer.state_dict(), "progress": asdict(progress), "rng": rng_by_rank[0],
        "data_files": data_files, "stream_states": stream_states}
    if len(rng_by_rank) > 1:
        payload["rng_by_rank"] = rng_by_rank
    return payload
