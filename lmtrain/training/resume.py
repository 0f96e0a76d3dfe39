"""What a run's checkpoint holds, and what `--resume` checks before it goes on from one.

A checkpoint is self-contained: config, tokenizer, weights, optimizer state, progress, every process's
RNG state, the carried stream states and the corpus's fingerprints. A resume refuses a config that would
learn something else than the run did (only the keys of RESUMABLE may change) and a corpus that changed
since, unless asked to go on (`--allow-changed-data`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, fields

from lmtrain.config import Config, differences, from_dict, get_value, to_dict
from lmtrain.data.cache import changed_files
from lmtrain.errors import LmtrainError

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

    @classmethod
    def from_checkpoint(cls, saved: dict) -> Progress:
        known = {field.name for field in fields(cls)}
        return cls(**{key: value for key, value in saved.items() if key in known})


def checked_resume(payload: dict, config: Config, data_files: dict, *, allow_changed_data: bool,
                   warn: Callable[[str], None]) -> Config:
    """`config` as the resumed run goes on with it (the run's own initialisation keys), after refusing a
    config that differs in what is learned and a corpus that changed since the checkpoint."""
    saved = from_dict(payload["config"])
    changed = differences(saved, config, ignore=RESUMABLE + INITIAL_ONLY)
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
                       stream_states: list, rng_by_rank: list[dict]) -> dict:
    """The checkpoint's contents; `rng_by_rank` is every process's RNG state (one entry for one process)."""
    payload = {
        "config": to_dict(config), "tokenizer": tokenizer.to_dict(), "model": model.state_dict(),
        "optimizer": optimizer.state_dict(), "progress": asdict(progress), "rng": rng_by_rank[0],
        "data_files": data_files, "stream_states": stream_states}
    if len(rng_by_rank) > 1:
        payload["rng_by_rank"] = rng_by_rank
    return payload
