"""The training loop: truncated BPTT (stream) or padded sentences, gradient clipping, evaluation,
checkpoints, exact resume.

Files in `train.out_dir`: `config.yaml` (the resolved config), `metrics.jsonl` (one JSON object per
log and evaluation event), `last.pt` (every `checkpoint_every` steps and at the end), `best.pt`
(lowest finite validation loss). Stopping: whichever of max_steps, max_epochs and max_seconds
(training time, evaluation excluded) comes first. Ctrl-C or SIGTERM finish the current step, write
`last.pt` and stop; `--resume` continues exactly where the run left off.

Started by torchrun (WORLD_SIZE > 1), this is one of several processes training one model with DDP
(see `distributed`): each trains on its rows of the global batch and evaluates its share of the
validation split; process 0 alone prints and writes the run folder.
"""

from __future__ import annotations

import json
import math
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from tqdm import tqdm

from lmtrain import gemm, kernels
from lmtrain.checkpoint import atomic_write_bytes, parameter_count
from lmtrain.config import DATA_PATHS, Config, differences, from_dict, get_value, to_dict, to_yaml
from lmtrain.cache import changed_files, data_fingerprints, load_corpus
from lmtrain.data import IGNORE, TrainingBatches, shard_batch, shard_rows
from lmtrain.distributed import (World, agree_on_step, check_batch_size, data_parallel, from_main, gather_objects,
                                 gather_rows, own_rows, process_device, process_group, run_on_all, sum_over_processes,
                                 world_from_environment)
from lmtrain.errors import LmtrainError, os_reason
from lmtrain.evaluate import Score, evaluation_sequences, perplexity, score
from lmtrain.memory import available_bytes, keep_freed_memory
from lmtrain.model import LanguageModel, check_size, parameter_estimate
from lmtrain.optim import build_optimizer, learning_rate
from lmtrain.regularization import activation_penalty
from lmtrain.rundir import RunDirectory
from lmtrain.sampling import generate, printable
from lmtrain.threads import ThreadCount
from lmtrain.tokenizer import Tokenizer, file_kind

# Keys a resumed run may change: how long to go on, how to report, and where and in what precision the
# products run (a run started with bfloat16 may go on where there is no AVX-512 BF16), not what is learned.
RESUMABLE = ("train.max_steps", "train.max_epochs", "train.max_seconds", "train.eval_every", "train.log_every",
             "train.checkpoint_every", "train.keep_last", "train.max_bad_steps", "train.final_samples", "train.sample_every",
             "train.tensorboard",
             "train.device", "train.threads", "train.precision", "train.out_dir", "data.cache")
# A vocabulary past this gets a warning: the softmax over it then dominates time and memory.
LARGE_VOCABULARY = 200_000

# Keys that only decide how the weights start: a resumed run has its weights, and keeps the values it
# started with (a run started before `model.init: auto` was the default goes on with its own).
INITIAL_ONLY = ("model.init", "model.forget_bias")


class TrainingInterrupted(LmtrainError):
    """SIGINT or SIGTERM arrived; `last.pt` was written. `exit_code` is 128 + the signal number."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class Progress:
    step: int = 0                        # optimizer steps taken
    epoch: int = 0                       # current epoch, 0-based
    batch_index: int = 0                 # batches of the current epoch already trained on
    best_valid_loss: float | None = None
    train_seconds: float = 0.0           # time in training steps (what max_seconds limits)
    elapsed_seconds: float = 0.0         # wall-clock time, evaluation and saving included
    tokens: int = 0                      # target tokens trained on


@dataclass
class TrainResult:
    out_dir: Path
    progress: Progress
    valid_loss: float | None
    stopped_by: str
    samples: list[str] = field(default_factory=list)
    model: LanguageModel | None = None   # the trained model, on its device


# train.precision -> the dtype of the training step's matrix products (`gemm.products_in`); None: float32.
PRECISIONS: dict[str, torch.dtype | None] = {"float32": None, "bfloat16": torch.bfloat16}


def resolve_device(name: str) -> torch.device:
    """`auto` is CUDA when present, else the CPU; asking for CUDA without it is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise LmtrainError(f"train.device is {name} but no CUDA device is available (use cpu or auto)")
        index = torch.device(name).index or 0
        if index >= torch.cuda.device_count():
            raise LmtrainError(f"train.device is {name} but only {torch.cuda.device_count()} CUDA device(s) exist")
    return torch.device(name)


def train(config: Config, *, resume: bool = False, echo: Callable[[str], None] = lambda line: None,
          warn: Callable[[str], None] | None = None, progress_bar: bool = True,
          on_start: Callable[[Config], None] | None = None, allow_changed_data: bool = False) -> TrainResult:
    """Train (or with `resume`, continue training) the model that `config` describes. Progress lines go
    to `echo`, warnings to `warn` (default: `echo` too); `progress_bar`: a bar on a terminal, a plain
    line every `train.log_every` steps otherwise. `on_start` is called with the run's config once the run
    can start (its folder taken, a resume checked). In a process that torchrun started, train with the
    others (`distributed`); all but process 0 are silent. A resume refuses a corpus that changed since
    the checkpoint unless `allow_changed_data`."""
    world = world_from_environment()
    warn = warn or echo
    if not world.is_main:
        echo = warn = _silent
        progress_bar = False
    check_batch_size(config.train.batch_size, world)
    device = process_device(resolve_device(config.train.device), world)
    with process_group(world, device):
        trainer = run_on_all(world, lambda: Trainer(config, resume=resume, echo=echo, warn=warn,
                                                    progress_bar=progress_bar, world=world, device=device,
                                                    allow_changed_data=allow_changed_data))
        return trainer.run(on_start=on_start if world.is_main else None)


def _silent(line: str) -> None:
    pass


class Trainer:
    def __init__(self, config: Config, *, resume: bool, echo: Callable[[str], None], warn: Callable[[str], None],
                 progress_bar: bool, world: World = World(), device: torch.device | None = None,
                 allow_changed_data: bool = False) -> None:
        self.config, self.echo, self.warn, self.progress_bar = config, echo, warn, progress_bar
        self.allow_changed_data = allow_changed_data
        self.threads = ThreadCount(config.train.threads)  # from here on it measures the load of other processes
        self.world, self.device = world, device or resolve_device(config.train.device)
        self.run_dir = RunDirectory(config.train.out_dir, keep_last=config.train.keep_last)
        self.out_dir = self.run_dir.path
        _check_data_files(config)
        self.data_files = data_fingerprints(config.data)  # kept in every checkpoint, checked on --resume
        # Only process 0 reads the folder (the machines need not share a disk); it hands the others the checkpoint.
        self.resume_path, payload = from_main(world, self._resume_payload if resume else self._fresh_start)
        # The checkpoint's tokenizer wins on resume; stream mode reads the ids from the token cache.
        corpus = load_corpus(config.data, tokenizer=Tokenizer.from_dict(payload["tokenizer"]) if payload else None,
                             echo=echo, warn=warn)
        self.tokenizer, self.corpus = corpus.tokenizer, corpus
        self._warn_unknown(corpus.unknown)
        self._check_sizes(config)
        torch.manual_seed(config.train.seed)
        self.model = LanguageModel.from_config(config.model, self.tokenizer.vocab_size).to(self.device)
        if world.distributed:  # dropout masks of their own in each process, as for different rows in one
            torch.manual_seed(config.train.seed + world.rank)
        self.optimizer = build_optimizer(self.model, config.train)
        # One data view per direction, keyed by "is backward": the split itself (text or cached ids), and
        # for `direction: bi` the split read right to left for the backward LM.
        self.directions = (False, True) if config.model.direction == "bi" else (False,)
        self.batches = {backward: TrainingBatches(self.tokenizer, corpus.view("train", backward=backward), mode=config.data.mode,
                                                  batch_size=config.train.batch_size, bptt=config.train.bptt,
                                                  seed=config.train.seed) for backward in self.directions}
        self.per_epoch = self.batches[False].per_epoch
        self.valid = {backward: evaluation_sequences(self.tokenizer, corpus.view("valid", backward=backward), config)
                      for backward in self.directions}
        if not self.valid[False]:
            raise LmtrainError(
                "the validation split holds no tokens: data.split cuts at line ends, so the file needs more lines "
                "(or give data.train and data.valid)" if config.data.path else f"{config.data.valid} holds no tokens")
        if config.data.eos == "line" and line_count(corpus.splits["train"], self.tokenizer.eos_id) <= 1:
            warn("warning: the training text has no line ends, so with data.eos: line it is one line that ends in "
                 "one <eos>; for text without line structure, data.eos: none")
        self.carries_state = config.data.mode == "stream"
        self.progress, self.states = Progress(), {backward: None for backward in self.directions}
        self.bad_steps = 0  # non-finite steps in a row
        self.summary_writer_class = _summary_writer_class() if config.train.tensorboard else None
        self.summary = None
        self.training_model: torch.nn.Module = self.model  # DDP's wrapper while `run` trains
        if payload:
            self._restore(payload)
        self.resumed_at = self.progress.step if payload else None

    def _check_sizes(self, config: Config) -> None:
        """Refuse a model that cannot fit (weights, gradients and the optimizer's state), before allocating
        it; warn of a vocabulary so large that the output layer dominates every step."""
        state = {"adam": 2, "adamw": 2, "sgd": 1 if config.train.momentum else 0}[config.train.optimizer]
        check_size(config.model, self.tokenizer.vocab_size, bytes_per_parameter=4 * (2 + state),
                   available=available_bytes() if self.device.type == "cpu" else None)
        V = self.tokenizer.vocab_size
        if V > LARGE_VOCABULARY:
            output = parameter_estimate(config.model, V)["output"]
            self.warn(f"warning: a vocabulary of {V:,} tokens: the output layer alone has {output:,} parameters, and "
                      f"every step makes batch x bptt x {V:,} logits; data.min_freq or data.max_vocab keep the "
                      f"frequent words (PTB keeps 10,000)")

    def _fresh_start(self) -> tuple[None, None]:  # no checkpoint to resume from
        # Never overwrite a run's checkpoints by starting again in its folder.
        if self.run_dir.has_run():
            raise LmtrainError(f"{self.out_dir} already holds a run (last.pt): add --resume to continue it, "
                               f"or choose another train.out_dir")
        return None, None

    def _resume_payload(self) -> tuple[str, dict]:  # plain values, to hand to the other processes
        path, payload, notes = self.run_dir.newest_intact()
        for note in notes:
            self.warn(note)
        saved = from_dict(payload["config"])
        changed = differences(saved, self.config, ignore=RESUMABLE + INITIAL_ONLY)
        if changed:
            raise LmtrainError("--resume: the config differs from the run's in " + ", ".join(
                f"{key} ({get_value(saved, key)!r} -> {get_value(self.config, key)!r})" for key in changed))
        self.config.model.init, self.config.model.forget_bias = saved.model.init, saved.model.forget_bias
        changes = changed_files(payload.get("data_files", self.data_files), self.data_files)
        if changes and not self.allow_changed_data:
            raise LmtrainError("--resume: the corpus changed since the run's checkpoint: " + "; ".join(changes)
                               + ": it would go on training, and choose best.pt, on other data; "
                                 "--allow-changed-data continues on purpose")
        if changes:
            self.warn("warning: the corpus changed since the run's checkpoint (" + "; ".join(changes)
                      + "); continuing on it, as --allow-changed-data asks")
        return str(path), payload

    def _restore(self, payload: dict) -> None:
        self.model.load_state_dict(payload["model"])
        self.optimizer.load_state_dict(payload["optimizer"])
        known = {field.name for field in fields(Progress)}
        self.progress = Progress(**{key: value for key, value in payload["progress"].items() if key in known})
        for backward, saved in zip(self.directions, payload["stream_states"]):
            # Saved for the global batch: this process takes its rows.
            self.states[backward] = own_rows(self.world, [tuple(t.to(self.device) for t in layer) for layer in saved]
                                             ) if saved else None
        # Each process's own RNG state; with another number of processes than saved, process 0's for all
        # (exact only without dropout).
        by_rank = payload.get("rng_by_rank", [])
        rng = by_rank[self.world.rank] if len(by_rank) == self.world.size else payload["rng"]
        torch.set_rng_state(rng["torch"])
        if self.device.type == "cuda" and rng.get("cuda"):
            if self.world.distributed:
                torch.cuda.set_rng_state(rng["cuda"][0], self.device)
            else:
                torch.cuda.set_rng_state_all(rng["cuda"])
        self.echo(f"resuming {self.resume_path} at step {self.progress.step} (epoch {self.progress.epoch + 1})")

    def _open_run_files(self) -> None:
        """Take the folder's lock, then write config.yaml and open metrics.jsonl."""
        self.run_dir.create()
        self.run_dir.lock()
        try:
            atomic_write_bytes(self.out_dir / "config.yaml", to_yaml(self.config).encode())
        except OSError as error:
            raise LmtrainError(f"cannot write to train.out_dir {self.out_dir}: {os_reason(error)}") from None
        self.metrics = self.run_dir.open_metrics(resumed_at=self.resumed_at)
        if self.summary_writer_class is not None:
            self.summary = self.summary_writer_class(log_dir=str(self.out_dir / "tensorboard"))

    def _warn_unknown(self, counts: dict[str, tuple[int, int]]) -> None:
        for split in ("valid", "test"):
            if split in counts:
                unknown, total = counts[split]
                if unknown:
                    self.warn(f"warning: {unknown} of {total} {split} tokens ({100 * unknown / max(total, 1):.2f}%) "
                              f"are not in the training vocabulary and count as <unk>")

    # -- the loop -------------------------------------------------------------------------------

    def run(self, on_start: Callable[[Config], None] | None = None) -> TrainResult:
        self.metrics = None
        keep_freed_memory()  # steps would otherwise fault their large buffers in anew each time
        try:
            run_on_all(self.world, self._open_run_files if self.world.is_main else lambda: None)
            if on_start is not None:
                on_start(self.config)
            self._load_compiled_kernels()
            self.threads_line = self.threads.start()
            self.training_model = data_parallel(self.model, self.world, self.device)
            return self._loop()
        finally:
            # DDP goes while the process group lives. Its Reducer holds the group too, and if it dropped the
            # last reference it would destroy it holding the GIL, which gloo's worker threads may need to free
            # a finished collective's tensors: a deadlock, seen here (pytorch/pytorch#56297).
            self.training_model = self.model
            self.threads.restore()
            if self.metrics is not None:
                self.metrics.close()
            if self.summary is not None:
                self.summary.close()
            self.run_dir.unlock()

    def _load_compiled_kernels(self) -> None:
        """Build or load the compiled kernels (`lmtrain.kernels`: every CPU model's loss, the LSTM's loops)
        now, before the clock starts: the first build on a machine takes about 30 s, which would otherwise
        count against max_seconds."""
        if self.device.type != "cpu":
            return
        module = kernels.load(announce=self.warn)
        if module is None and kernels.required():
            raise LmtrainError(f"{kernels.SWITCH}=1, but the compiled kernels are not available: "
                               f"{kernels.unavailable_reason()}")
        if module is not None and self.config.train.precision == "bfloat16" and not module.bf16_products_supported():
            self.warn("warning: train.precision is bfloat16 but this CPU has no AVX-512 BF16: the products run in "
                      "emulated bfloat16 and the LSTM in its Python loops, which may be slower than float32 "
                      "(scripts/bench_precision.py measures both)")

    def _loop(self) -> TrainResult:
        train_config = self.config.train
        self.echo(f"model: {self.config.model.cell} {self.config.model.num_layers}x{self.config.model.hidden_size}, "
                  f"{parameter_count(self.model):,} parameters, vocabulary {self.tokenizer.vocab_size}, "
                  f"{self.per_epoch} batches per epoch, device {self.device}"
                  + (f", {self.threads_line}" if self.device.type == "cpu" else "")
                  + (f", {self.world.size} processes" if self.world.distributed else "")
                  + (", with a backward LM (direction: bi)" if len(self.directions) == 2 else ""))
        total = self._total_steps()
        # A bar on a terminal; into a file or a pipe, where a bar is carriage-return noise, plain lines.
        self.plain_progress = self.progress_bar and not sys.stderr.isatty()
        shown = self.progress_bar and not self.plain_progress
        bar = tqdm(total=total, initial=self.progress.step, disable=not shown, unit="step", dynamic_ncols=True)
        echo, warn = self.echo, self.warn
        if shown:  # lines written through the bar, so that it is redrawn below them
            self.echo, self.warn = bar.write, lambda line: bar.write(line, file=sys.stderr)
        window = {"loss": torch.zeros((), device=self.device), "tokens": 0, "seconds": 0.0, "steps": 0}
        valid_loss, last_eval_step = None, -1
        started = time.perf_counter() - self.progress.elapsed_seconds
        # Under torchrun a Ctrl-C arrives twice (from the terminal, and forwarded by the launcher), and the
        # launcher ends what is still running after its own timeout: a second signal must not stop at once.
        with _StopSignals(second_stops_at_once=not self.world.distributed) as stop:
            while (reason := self._limit_reached()) is None:
                stop_signal = self._train_step(window, stop)
                if (change := self.threads.follow()) is not None:
                    self.echo(change)
                self.progress.elapsed_seconds = time.perf_counter() - started
                step = self.progress.step
                bar.update(1)
                if step % train_config.log_every == 0:
                    self._log_train(window, bar)
                if step % train_config.eval_every == 0:
                    valid_loss, last_eval_step = self._evaluate(), step
                if train_config.sample_every and step % train_config.sample_every == 0 and self.world.is_main:
                    self.echo(f"step {step} samples:\n" + "\n".join(map(printable, self._samples(3))))
                if step % train_config.checkpoint_every == 0 and self.bad_steps == 0:
                    self._save_last()  # not while steps are failing: the last good checkpoint stays
                if stop_signal is not None:
                    self._save_last()
                    bar.close()
                    raise self._everywhere(TrainingInterrupted(
                        f"stopped by {signal.Signals(stop_signal).name} at step {step}; {self.run_dir.last} written; "
                        f"continue with: {self._resume_command()}", 128 + stop_signal))
        if last_eval_step != self.progress.step:
            valid_loss = self._evaluate()
        self._save_last()
        bar.close()
        self.echo, self.warn = echo, warn
        samples = self._samples(self.config.train.final_samples)
        return TrainResult(self.out_dir, self.progress, valid_loss, reason, samples, self.model)

    def _resume_command(self) -> str:
        command = f"lmtrain train {self.out_dir / 'config.yaml'} --resume"
        one_machine = self.world.distributed and self.world.local_size == self.world.size
        return command + (f" --nproc {self.world.size}" if one_machine else "")

    def _everywhere(self, error: LmtrainError) -> LmtrainError:
        """An error that every process raises at the same step: process 0 alone prints it."""
        error.quiet = not self.world.is_main
        return error

    def _total_steps(self) -> int | None:
        limits = [self.config.train.max_steps,
                  self.config.train.max_epochs and self.config.train.max_epochs * self.per_epoch]
        return min((limit for limit in limits if limit), default=None)

    def _limit_reached(self) -> str | None:
        train_config, progress = self.config.train, self.progress
        if progress.batch_index >= self.per_epoch:
            progress.epoch, progress.batch_index = progress.epoch + 1, 0
            self.states = {backward: None for backward in self.directions}
        if train_config.max_steps is not None and progress.step >= train_config.max_steps:
            return "max_steps"
        if train_config.max_epochs is not None and progress.epoch >= train_config.max_epochs:
            return "max_epochs"
        if train_config.max_seconds is not None and progress.train_seconds >= train_config.max_seconds:
            return "max_seconds"
        return None

    def _train_step(self, window: dict, stop: _StopSignals) -> int | None:
        """One optimizer step on the global batch; returns the stop signal that all processes agree on."""
        train_config, progress, world = self.config.train, self.progress, self.world
        try:
            self.corpus.check_mapped()
        except LmtrainError:
            if not world.distributed:  # the steps so far are sound: keep them (several processes cannot agree here)
                self._save_last()
            raise
        begin = time.perf_counter()
        lr = self._lr()
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.training_model.train()
        with gemm.products_in(PRECISIONS[train_config.precision]):
            total, count = self._forward_and_backward()
        norm = gradient_norm(self.model, clip=train_config.clip)  # so all clip alike
        total, seconds, stop_signal = agree_on_step(world, total, time.perf_counter() - begin, stop.signal)
        progress.step, progress.batch_index = progress.step + 1, progress.batch_index + 1
        if bool(torch.isfinite(total) & torch.isfinite(norm)):
            self.optimizer.step()
            self.bad_steps = 0
            progress.tokens += count
            window["loss"] += total
            window["tokens"] += count
            window["steps"] += 1
        else:
            self._skip_bad_step(float(total) / count, float(norm))
        if not world.distributed:  # the whole step; several processes count the time they agreed on, so that
            seconds = time.perf_counter() - begin  # max_seconds stops them all at the same step
        window["seconds"] += seconds
        progress.train_seconds += seconds
        return stop_signal

    def _forward_and_backward(self) -> tuple[torch.Tensor, int]:
        """The global batch's loss and its gradients (left in the parameters' .grad); returns the summed
        NLL and the token count."""
        progress, world = self.progress, self.world
        losses, total, count = [], 0.0, 0
        for backward in self.directions:
            batch = self.batches[backward].batch(progress.epoch, progress.batch_index)   # the global batch
            batch_count = int((batch[1] != IGNORE).sum())
            inputs, targets = (t.to(self.device, non_blocking=True)
                               for t in shard_batch(batch, rank=world.rank, world_size=world.size))
            state = self.states[backward]
            if state is not None:
                # Truncated BPTT: keep the state's value, cut the graph to the previous chunk.
                state = [tuple(t.detach() for t in layer) for layer in state]
            direction_total, state, (a, a_dropped) = self.training_model(
                inputs, state, targets=targets, ignore_index=IGNORE, backward=backward, hidden=True)
            # The mean over the global batch's tokens. DDP averages the N processes' gradients, so each
            # divides its sum by the global count / N: exact however the padding falls between them.
            losses.append(direction_total / (batch_count / world.size) + self._activation_penalty(a, a_dropped, targets))
            total, count = total + direction_total.detach(), count + batch_count
            self.states[backward] = state if self.carries_state else None
        loss = sum(losses) / len(losses)  # ELMo: the mean of the forward and backward LMs' losses
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()  # under DDP, the gradients are averaged over the processes here
        return total, count

    def _activation_penalty(self, a: torch.Tensor, a_dropped: torch.Tensor, targets: torch.Tensor) -> torch.Tensor | float:
        """AR and TAR (Merity et al. 2017), over the positions that have a target; 0 when both are off."""
        alpha, beta = self.config.train.activation_regularization, self.config.train.temporal_activation_regularization
        if not (alpha or beta):
            return 0.0
        mask = (targets != IGNORE).to(a.dtype) if self.config.data.mode == "sentences" else None
        return activation_penalty(a, a_dropped, mask, alpha=alpha, beta=beta)

    def _skip_bad_step(self, loss: float, norm: float) -> None:
        """A non-finite loss or gradient: no update, and the carried state (possibly NaN) starts over."""
        self.optimizer.zero_grad(set_to_none=True)
        self.states = {backward: None for backward in self.directions}
        self.bad_steps += 1
        self.warn(f"warning: step {self.progress.step} skipped: loss {loss}, gradient norm {norm}")
        if self.bad_steps >= self.config.train.max_bad_steps:
            raise self._everywhere(LmtrainError(
                f"stopped at step {self.progress.step}: {self.bad_steps} steps in a row had a non-finite loss or "
                f"gradient (train.max_bad_steps); the last good checkpoint {self.run_dir.last} is kept as it was; "
                f"a lower train.lr or train.clip may help"))

    def _lr(self) -> float:
        c = self.config.train
        return learning_rate(self.progress.step, lr=c.lr, schedule=c.schedule, warmup_steps=c.warmup_steps,
                             total_steps=self._total_steps(), min_lr=c.min_lr, decay_start=c.decay_start,
                             decay_every=c.decay_every, decay_rate=c.decay_rate,
                             time_fraction=self.progress.train_seconds / c.max_seconds if c.max_seconds else None)

    def _log_train(self, window: dict, bar: tqdm) -> None:
        loss = float(window["loss"]) / max(window["tokens"], 1)
        tokens_per_s = window["tokens"] / max(window["seconds"], 1e-9)
        self._log_event("train", loss, tokens_per_s)
        total, progress = self._total_steps(), self.progress
        left = time_left(step=progress.step, total_steps=total, train_seconds=progress.train_seconds,
                         max_seconds=self.config.train.max_seconds,
                         seconds_per_step=window["seconds"] / max(window["steps"], 1))
        budget = {"left": duration(left)} if self.config.train.max_seconds is not None and left is not None else {}
        bar.set_postfix(loss=f"{loss:.3f}", lr=f"{self._lr():.2e}", tok_s=f"{tokens_per_s:,.0f}", **budget,
                        refresh=False)
        if self.plain_progress:
            self.echo(f"step {progress.step:,}{f'/{total:,}' if total else ''}: loss {loss:.3f}, lr {self._lr():.2e}, "
                      f"{tokens_per_s:,.0f} tokens/s, {duration(progress.elapsed_seconds)} elapsed"
                      + (f", {duration(left)} left" if left is not None else ""))
        window.update(loss=torch.zeros((), device=self.device), tokens=0, seconds=0.0, steps=0)

    def _evaluate(self) -> float:
        """Validation loss (the mean over directions for a `bi` model); writes best.pt on a new best."""
        self.corpus.check_mapped()
        losses, notes = [], []
        for backward in self.directions:
            begin = time.perf_counter()
            result = self._score(backward)
            split = "valid_backward" if backward else "valid"
            self._log_event(split, result.loss, result.tokens / max(time.perf_counter() - begin, 1e-9))
            losses.append(result.loss)
            notes.append(f"{split} loss {result.loss:.4f}, perplexity {result.perplexity:.2f}")
        loss = sum(losses) / len(losses)
        best = self.progress.best_valid_loss
        if math.isfinite(loss) and (best is None or loss < best):  # the same loss, so the same choice, in all
            self.progress.best_valid_loss = loss
            self._write(self.run_dir.save_best)
        self.echo(f"step {self.progress.step}: {'; '.join(notes)}" + (" (best)" if self.progress.best_valid_loss == loss else ""))
        return loss

    def _score(self, backward: bool) -> Score:
        """The validation score; several processes each score a contiguous share and add up the sums.
        (The unwrapped model: DDP's forward would wait for the others' backward pass.)"""
        sequences = self.valid[backward]
        share = sequences[shard_rows(len(sequences), rank=self.world.rank, world_size=self.world.size)]
        result: Score = score(self.model, share, device=self.device, backward=backward,
                              before_batch=self.corpus.check_mapped)
        if not self.world.distributed:
            return result
        mine = torch.tensor([result.loss * result.tokens if result.tokens else 0.0, result.tokens], dtype=torch.float64)
        total, tokens = sum_over_processes(self.world, mine.to(self.device)).tolist()
        return Score(loss=total / tokens if tokens else math.nan, tokens=int(tokens))

    def _log_event(self, split: str, loss: float, tokens_per_s: float) -> None:
        if self.metrics is None:  # not process 0
            return
        event = {"step": self.progress.step, "split": split, "loss": round(loss, 6),
                 "ppl": round(perplexity(loss), 4), "lr": self._lr(), "tokens_per_s": round(tokens_per_s, 1),
                 "elapsed_s": round(self.progress.elapsed_seconds, 3), "threads": self.threads.count}
        # Strict JSON: a non-finite number (a diverged loss) is null, not NaN or Infinity, which JSON lacks.
        event = {name: None if isinstance(value, float) and not math.isfinite(value) else value
                 for name, value in event.items()}
        self.metrics.write(json.dumps(event, allow_nan=False) + "\n")
        self.metrics.flush()
        if self.summary is not None:
            for name in ("loss", "ppl", "lr", "tokens_per_s"):
                if event[name] is not None:
                    self.summary.add_scalar(f"{name}/{split}", event[name], self.progress.step)

    def _save_last(self) -> None:
        step = self.progress.step
        self._write(lambda payload: self.run_dir.save_last(payload, step))

    def _write(self, save: Callable[[dict], None]) -> None:
        """All processes gather the checkpoint, process 0 saves it; a failed write stops them all. Weights
        that are no longer finite numbers are never written: the run stops, the last good checkpoint kept."""
        if not all(bool(torch.isfinite(parameter).all()) for parameter in self.model.parameters()):
            raise self._everywhere(LmtrainError(
                f"stopped at step {self.progress.step}: the weights are no longer finite numbers (NaN or "
                f"infinity), so no checkpoint is written; the checkpoints written before are kept as they were; "
                f"a lower train.lr or train.clip may help"))
        payload = self._payload()
        run_on_all(self.world, lambda: save(payload) if self.world.is_main else None)

    def _payload(self) -> dict:
        """The checkpoint. Every process must call this at the same step: the carried states (of the
        global batch, whatever the number of processes) and each process's RNG state are gathered."""
        rng = gather_objects(self.world, self._rng_state())
        payload = {
            "config": to_dict(self.config), "tokenizer": self.tokenizer.to_dict(),
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "progress": asdict(self.progress), "rng": rng[0], "data_files": self.data_files,
            "stream_states": [gather_rows(self.world, self.states[backward]) for backward in self.directions]}
        if self.world.distributed:
            payload["rng_by_rank"] = rng
        return payload

    def _rng_state(self) -> dict:
        if self.device.type != "cuda":
            cuda = []
        elif self.world.distributed:  # each process draws on its own GPU
            cuda = [torch.cuda.get_rng_state(self.device)]
        else:
            cuda = torch.cuda.get_rng_state_all()
        return {"torch": torch.get_rng_state(), "cuda": cuda}

    def _samples(self, count: int) -> list[str]:
        if count == 0 or not self.world.is_main:
            return []
        # A generator of its own, so sampling does not move the training RNG streams (exact resume).
        generator = torch.Generator(device=self.device).manual_seed(self.config.train.seed)
        return generate(self.model, self.tokenizer, num=count,
                        sentence_start=self.config.data.mode == "sentences", max_tokens=200, generator=generator)


def _check_data_files(config: Config) -> None:
    """Training reads its corpus more than once (splitting, tokenizing) and fingerprints it for
    `--resume`: a pipe or a device cannot serve, and would hang or come back empty."""
    for key in DATA_PATHS:
        path = get_value(config, key)
        if path is not None and (kind := file_kind(path)) not in ("file", "missing", "directory"):
            raise LmtrainError(f"{key} {path} is a {kind}, not a regular file: training reads its corpus more "
                               f"than once and checks it on --resume; save it to a file first (lmtrain eval "
                               f"perplexity --data reads a pipe once)")


def line_count(split: str | torch.Tensor, eos_id: int) -> int:
    """How many lines a split holds (a last one without its line end counted): from its text, or from the
    `<eos>` ids of its cached stream after the one that starts it."""
    if isinstance(split, str):
        return split.count("\n") + (1 if split and not split.endswith("\n") else 0)
    return max(0, int((split == eos_id).sum()) - 1)


def time_left(*, step: int, total_steps: int | None, train_seconds: float, max_seconds: float | None,
              seconds_per_step: float) -> float | None:
    """Seconds of training left: to the time budget, or through the steps left at the recent pace,
    whichever ends first; None when neither limit is set."""
    left = []
    if max_seconds is not None:
        left.append(max(0.0, max_seconds - train_seconds))
    if total_steps is not None:
        left.append(max(0, total_steps - step) * seconds_per_step)
    return min(left) if left else None


def duration(seconds: float) -> str:
    """`42 s`, `3 min 5 s`, `2 h 7 min`."""
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"


def gradient_norm(model: torch.nn.Module, *, clip: float) -> torch.Tensor:
    """The global gradient norm, clipped to `clip` first when `clip > 0` (Pascanu et al. 2013)."""
    if clip > 0:
        return torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    return torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])


def _summary_writer_class() -> type:
    """TensorBoard's SummaryWriter, or a clear error when the optional package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise LmtrainError("train.tensorboard needs the tensorboard package: pip install tensorboard") from None
    return SummaryWriter


class _StopSignals:
    """While training, SIGINT and SIGTERM only set a flag; the loop stops after the current step. A
    second signal stops at once, if `second_stops_at_once`."""

    def __init__(self, *, second_stops_at_once: bool = True) -> None:
        self.signal: int | None = None
        self.second_stops_at_once = second_stops_at_once
        self._previous: dict[int, object] = {}

    def __enter__(self) -> _StopSignals:
        if threading.current_thread() is threading.main_thread():
            for number in (signal.SIGINT, signal.SIGTERM):
                self._previous[number] = signal.signal(number, self._handle)
        return self

    def _handle(self, number: int, frame: object) -> None:
        if self.signal is not None and self.second_stops_at_once:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.signal = number

    def __exit__(self, *exc_info: object) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
