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

import math
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import torch
from tqdm import tqdm

from lmtrain.checkpoint import parameter_count, resolve_device
from lmtrain.config import Config, checked, to_yaml
from lmtrain.data.cache import data_fingerprints, load_corpus
from lmtrain.data.dataset import IGNORE, TrainingBatches, check_data_files, shard_batch
from lmtrain.data.tokenizer import Tokenizer
from lmtrain.errors import LmtrainError
from lmtrain.evaluation.sampling import NonFiniteOutputs, check_side_by_side, generate, printable
from lmtrain.model.language_model import LanguageModel
from lmtrain.model.objective import Objective
from lmtrain.speed import kernels
from lmtrain.speed.memory import keep_freed_memory
from lmtrain.speed.threads import ThreadCount
from lmtrain.training.distributed import (
    World,
    agree_on_step,
    check_batch_size,
    data_parallel,
    from_main,
    process_device,
    process_group,
    run_on_all,
    stop_everywhere,
    world_from_environment,
)
from lmtrain.training.metrics import (
    Metrics,
    Window,
    duration,
    event,
    progress_line,
    run_line,
    summary_writer_class,
    time_left,
)
from lmtrain.training.optim import (
    build_optimizer,
    check_fits,
    gradient_norm,
    scheduled_rate,
    total_steps,
    warmup_past_epochs,
)
from lmtrain.training.resume import (
    Progress,
    checkpoint_payload,
    fresh_start,
    restore,
    resume_command,
    resume_payload,
)
from lmtrain.training.rundir import RunDirectory
from lmtrain.training.signals import StopSignals, TrainingInterrupted  # noqa: F401 - TrainingInterrupted: the API's
from lmtrain.training.validation import Validation


def bar_size(stream: TextIO) -> dict[str, Any]:
    """tqdm's size options for a bar on `stream`: the terminal's width as it changes, or 80 x 24 where the
    terminal says it has no columns or no rows (`script` on a terminal of unset size): tqdm draws nothing
    on a screen of no rows."""
    try:
        columns, rows = os.get_terminal_size(stream.fileno())
    except (OSError, ValueError):
        columns = rows = 0
    return {"dynamic_ncols": True} if columns > 0 and rows > 0 else {"ncols": columns or 80, "nrows": rows or 24}


@dataclass
class TrainResult:
    out_dir: Path
    progress: Progress
    valid_loss: float | None
    stopped_by: str
    samples: list[str] = field(default_factory=list)
    model: LanguageModel | None = None   # the trained model, on its device


def train(config: Config, *, resume: bool = False, echo: Callable[[str], None] = lambda line: None,
          warn: Callable[[str], None] | None = None, progress_bar: bool = True,
          on_start: Callable[[Config], None] | None = None, allow_changed_data: bool = False) -> TrainResult:
    """Train (or with `resume`, continue training) the model that `config` describes. Progress lines go
    to `echo`, warnings to `warn` (default: `echo` too); `progress_bar`: a bar on a terminal, a plain
    line every `train.log_every` steps otherwise. `on_start` is called with the run's config once the run
    can start (its folder taken, a resume checked). In a process that torchrun started, train with the
    others (`distributed`); all but process 0 are silent. A resume refuses a corpus that changed since
    the checkpoint unless `allow_changed_data`. torch's random state is the caller's again afterwards."""
    config = checked(config)
    world = world_from_environment()
    warn = warn or echo
    if not world.is_main:
        echo = warn = _silent
        progress_bar = False
    check_batch_size(config.train.batch_size, world)
    device = process_device(resolve_device(config.train.device), world)
    # The run seeds torch's generators (train.seed); the caller's random state is theirs, kept as it was
    # (the CPU's and this process's GPU's: reading another GPU's would open a context on it).
    caller_generators = [device.index if device.index is not None else torch.cuda.current_device()
                         ] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=caller_generators), process_group(world, device):
        trainer = run_on_all(world, lambda: Trainer(config, resume=resume, echo=echo, warn=warn,
                                                    progress_bar=progress_bar, world=world, device=device,
                                                    allow_changed_data=allow_changed_data))
        try:
            return trainer.run(on_start=on_start if world.is_main else None)
        finally:
            del trainer  # its DDP model holds the process group, which ends with the block


def _silent(line: str) -> None:
    pass


class Trainer:
    def __init__(self, config: Config, *, resume: bool, echo: Callable[[str], None], warn: Callable[[str], None],
                 progress_bar: bool, world: World = World(), device: torch.device | None = None,
                 allow_changed_data: bool = False) -> None:
        self.config, self.warn, self.progress_bar = config, warn, progress_bar
        self.output_closed = False
        self.echo = self._until_output_closes(echo)
        self.threads = ThreadCount(config.train.threads)  # from here on it measures the load of other processes
        self.world, self.device = world, device or resolve_device(config.train.device)
        self.run_dir = RunDirectory(config.train.out_dir, keep_last=config.train.keep_last)
        self.out_dir = self.run_dir.path
        try:
            self._set_up(resume=resume, allow_changed_data=allow_changed_data)
        except BaseException:  # a resume locks the folder before it reads it: let it go again
            self.run_dir.unlock()
            raise

    def _until_output_closes(self, echo: Callable[[str], None]) -> Callable[[str], None]:
        """`echo`, or nothing once standard output is closed (`lmtrain train | head`): the run then stops
        after the step, as on a signal, its steps saved, where the closed pipe used to end it unsaved."""
        def echoed(line: str) -> None:
            if self.output_closed:
                return
            try:
                echo(line)
            except BrokenPipeError:
                self.output_closed = True
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # what is still buffered, gone
        return echoed

    def _set_up(self, *, resume: bool, allow_changed_data: bool) -> None:
        """Read the data and the checkpoint to resume from, build the model, the optimizer and the batches."""
        config, world, echo, warn = self.config, self.world, self.echo, self.warn
        check_data_files(config)
        self.data_files = data_fingerprints(config.data)  # kept in every checkpoint, checked on --resume
        # Only process 0 reads the folder (the machines need not share a disk); it hands the others the checkpoint.
        self.resume_path, payload = from_main(world, lambda: resume_payload(
            self.run_dir, config, self.data_files, allow_changed_data=allow_changed_data, warn=warn)
            if resume else fresh_start(self.run_dir))
        # The checkpoint's tokenizer wins on resume; stream mode reads the ids from the token cache.
        self.corpus = load_corpus(config.data, tokenizer=Tokenizer.from_dict(payload["tokenizer"]) if payload else None,
                                  echo=echo, warn=warn)
        self.tokenizer = self.corpus.tokenizer
        for line in self.corpus.unknown_warnings():
            warn(line)
        check_fits(config, self.tokenizer.vocab_size, device=self.device, warn=warn)
        check_side_by_side(config.train.final_samples, self.tokenizer.vocab_size, "train.final_samples")
        torch.manual_seed(config.train.seed)
        self.model = LanguageModel.from_config(config.model, self.tokenizer.vocab_size).to(self.device)
        if world.distributed:  # dropout masks of their own in each process, as for different rows in one
            torch.manual_seed(config.train.seed + world.rank)
        self.optimizer = build_optimizer(self.model, config.train)
        self.objective = Objective(self.model, ignore_index=IGNORE, padded=config.data.mode == "sentences",
                                   activation_regularization=config.train.activation_regularization,
                                   temporal_activation_regularization=config.train.temporal_activation_regularization)
        # Every LM of the model reads its own view of the split: the text, or read right to left (`direction: bi`).
        self.batches = [TrainingBatches(self.tokenizer, self.corpus.view("train", right_to_left=right_to_left),
                                        mode=config.data.mode, batch_size=config.train.batch_size,
                                        bptt=config.train.bptt, seed=config.train.seed)
                        for right_to_left in self.model.directions]
        self.per_epoch = self.batches[0].per_epoch
        if short_budget := warmup_past_epochs(config.train, self.per_epoch):
            warn(short_budget)
        self.validation = Validation(self.corpus, config, self.model.directions)
        for line in self.corpus.line_end_warnings():
            warn(line)
        self.progress, self.states = Progress(), [None for _ in self.model.directions]
        self.bad_steps = 0  # non-finite steps in a row
        if config.train.tensorboard:
            summary_writer_class()  # missing: say so now, before the run starts
        self.metrics: Metrics | None = None  # process 0's, once `run` opens the folder
        self.training_objective: torch.nn.Module = self.objective  # DDP's wrapper while `run` trains
        if payload:
            self.progress, self.states = restore(payload, model=self.model, optimizer=self.optimizer, world=world,
                                                 device=self.device)
            echo(f"resuming {self.resume_path} at step {self.progress.step:,} (epoch {self.progress.epoch + 1})")
        self.resumed_at = self.progress.step if payload else None

    def run(self, on_start: Callable[[Config], None] | None = None) -> TrainResult:
        self.metrics = None
        keep_freed_memory()  # steps would otherwise fault their large buffers in anew each time
        try:
            run_on_all(self.world, self._open_run_files if self.world.is_main else lambda: None)
            if on_start is not None:
                on_start(self.config)
            if self.device.type == "cpu":  # now, before the clock starts: a first build takes most of a minute
                kernels.load_for_training(bfloat16=self.config.train.precision == "bfloat16",
                                          hidden_size=self.config.model.hidden_size, warn=self.warn)
            self.threads_line = self.threads.start()
            self.training_objective = data_parallel(self.objective, self.world, self.device)
            return self._loop()
        finally:
            # DDP goes while the process group lives. Its Reducer holds the group too, and if it dropped the
            # last reference it would destroy it holding the GIL, which gloo's worker threads may need to free
            # a finished collective's tensors: a deadlock, seen here (pytorch/pytorch#56297).
            self.training_objective = self.objective
            self.threads.restore()
            if self.metrics is not None:
                self.metrics.close()
            self.run_dir.unlock()

    def _open_run_files(self) -> None:
        """Take the folder's lock, write config.yaml, open metrics.jsonl."""
        self.run_dir.open_for_run(to_yaml(self.config), fresh=self.resumed_at is None)
        self.metrics = Metrics(self.run_dir, resumed_at=self.resumed_at, tensorboard=self.config.train.tensorboard,
                               warn=self.warn)

    def _loop(self) -> TrainResult:
        world = self.world
        self.echo(run_line(self.config.model, parameters=parameter_count(self.model),
                           vocab_size=self.tokenizer.vocab_size, per_epoch=self.per_epoch, device=self.device,
                           threads=self.threads_line, processes=world.size))
        # A bar on a terminal; into a file or a pipe, where a bar is carriage-return noise, plain lines.
        self.plain_progress = self.progress_bar and not sys.stderr.isatty()
        shown = self.progress_bar and not self.plain_progress
        bar = tqdm(total=self._total_steps(), initial=self.progress.step, disable=not shown, unit="step",
                   **bar_size(sys.stderr))
        echo, warn = self.echo, self.warn
        if shown:  # lines written through the bar, so that it is redrawn below them
            self.echo, self.warn = bar.write, lambda line: bar.write(line, file=sys.stderr)
        try:
            valid_loss, reason = self._steps(bar)
        finally:  # on every way out, a stop or an error too: the bar closed, the lines printed plainly again
            bar.close()
            self.echo, self.warn = echo, warn
        samples = self._samples(self.config.train.final_samples)
        return TrainResult(self.out_dir, self.progress, valid_loss, reason, samples, self.model)

    def _steps(self, bar: tqdm) -> tuple[float | None, str]:
        """Train until a limit is reached: the last validation loss and the limit's reason. A stop signal
        ends it with the checkpoint written and an error saying how to resume."""
        train_config, world = self.config.train, self.world
        window, valid_loss, last_eval_step = Window(), None, -1
        started = time.perf_counter() - self.progress.elapsed_seconds
        # Under torchrun a Ctrl-C arrives twice (from the terminal, and forwarded by the launcher), and the
        # launcher ends what is still running after its own timeout: a second signal must not stop at once.
        with StopSignals(second_stops_at_once=not world.distributed) as stop:
            while (reason := self._limit_reached()) is None:
                if self.output_closed and stop.signal is None:
                    stop.signal = signal.SIGPIPE
                stop_signal = self._train_step(window, stop)
                if (change := self.threads.follow()) is not None:
                    self.echo(change)
                self.progress.elapsed_seconds = time.perf_counter() - started
                step = self.progress.step
                bar.update(1)
                if step % train_config.log_every == 0:
                    self._log_train(window, bar)
                    window = Window()
                if step % train_config.eval_every == 0:
                    valid_loss, last_eval_step = self._evaluate(), step
                if train_config.sample_every and step % train_config.sample_every == 0 and world.is_main:
                    self.echo(f"step {step:,} samples:\n" + "\n".join(map(printable, self._samples(3))))
                if step % train_config.checkpoint_every == 0 and self.bad_steps == 0:
                    self._save_last()  # not while steps are failing: the last good checkpoint stays
                if stop_signal is not None:
                    self._save_last()
                    raise self._everywhere(stop.interrupted(stop_signal, step=step, written=str(self.run_dir.last),
                                                            resume_command=resume_command(self.out_dir, world)))
            # Still under the signals: a Ctrl-C here lets the final evaluation and checkpoint finish.
            if last_eval_step != self.progress.step:
                valid_loss = self._evaluate()
            if self.progress.step == self.resumed_at and Path(self.resume_path) == self.run_dir.last:
                # A finished run resumed: last.pt holds this very state; only a smaller keep_last has work.
                run_on_all(world, self.run_dir.prune if world.is_main else lambda: None)
            else:
                self._save_last()
        return valid_loss, reason

    def _limit_reached(self) -> str | None:
        if self.progress.batch_index >= self.per_epoch:  # a new epoch, and the streams start over
            self.progress.epoch, self.progress.batch_index = self.progress.epoch + 1, 0
            self.states = [None for _ in self.states]
        return self.progress.stop_reason(self.config.train)

    def _train_step(self, window: Window, stop: StopSignals) -> int | None:
        """One optimizer step on the global batch; returns the stop signal that all processes agree on."""
        progress, world = self.progress, self.world
        try:
            self.corpus.check_mapped()
        except LmtrainError:
            if not world.distributed:  # the steps so far are sound: keep them (several processes cannot agree here)
                self._save_last()
            raise
        begin = time.perf_counter()
        for group in self.optimizer.param_groups:
            group["lr"] = self._lr()
        self.training_objective.train()
        # The global batch of every LM; this process trains on its rows.
        batches = [lm_batches.batch(progress.epoch, progress.batch_index) for lm_batches in self.batches]
        counts = [int((targets != IGNORE).sum()) for _, targets in batches]
        rows = [tuple(t.to(self.device, non_blocking=True) for t in shard_batch(batch, rank=world.rank,
                                                                                world_size=world.size))
                for batch in batches]
        # Truncated BPTT: the carried state keeps its value, its graph is cut at the previous chunk.
        states = [None if state is None else [tuple(t.detach() for t in layer) for layer in state]
                  for state in self.states]
        # The mean over the global batch's tokens. DDP averages the N processes' gradients, so each divides
        # its sum by the global count / N: exact however the padding falls between them.
        loss, total, states = self.training_objective(rows, states, [count / world.size for count in counts],
                                                      self.config.train.precision)
        self.states = states if self.config.data.mode == "stream" else [None for _ in states]
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()  # under DDP, the gradients are averaged over the processes here
        count = sum(counts)
        norm = gradient_norm(self.model, clip=self.config.train.clip)  # so all clip alike
        total, seconds, stop_signal = agree_on_step(world, total, time.perf_counter() - begin, stop.signal)
        progress.step, progress.batch_index = progress.step + 1, progress.batch_index + 1
        if bool(torch.isfinite(total) & torch.isfinite(norm)):
            self.optimizer.step()
            self.bad_steps = 0
            progress.tokens += count
            window.loss, window.tokens, window.steps = window.loss + total, window.tokens + count, window.steps + 1
        else:
            window.skipped += 1  # its loss stays out of the logged mean
            self._skip_bad_step(float(total) / count, float(norm))
        if not world.distributed:  # the whole step; several processes count the time they agreed on, so that
            seconds = time.perf_counter() - begin  # max_seconds stops them all at the same step
        window.seconds += seconds
        progress.train_seconds += seconds
        return stop_signal

    def _skip_bad_step(self, loss: float, norm: float) -> None:
        """A non-finite loss or gradient: no update, and the carried state (possibly NaN) starts over."""
        self.optimizer.zero_grad(set_to_none=True)
        self.states = [None for _ in self.states]
        self.bad_steps += 1
        self.warn(f"warning: step {self.progress.step:,} skipped: loss {loss}, gradient norm {norm}")
        if self.bad_steps >= self.config.train.max_bad_steps:
            raise self._everywhere(LmtrainError(
                f"stopped at step {self.progress.step:,}: {self.bad_steps} steps in a row had a non-finite loss or "
                f"gradient (train.max_bad_steps); {self._checkpoints_kept()}; a lower train.lr or train.clip may help"))

    def _checkpoints_kept(self) -> str:
        """What a run that stops on non-finite numbers leaves to resume from, as it is on disk: none are
        written while steps fail, so every checkpoint in the folder predates the failure."""
        if self.run_dir.last.exists():
            return f"the last good checkpoint {self.run_dir.last} is kept as it was"
        kept = [path.name for path in (*self.run_dir.step_files(), self.run_dir.best) if path.exists()]
        if kept:
            return (f"no last.pt was written before it; {', '.join(kept)} in {self.out_dir} "
                    + ("is kept as it was" if len(kept) == 1 else "are kept as they were"))
        return f"no checkpoint was written before it, so {self.out_dir} holds none to resume from"

    def _total_steps(self) -> int | None:
        return total_steps(self.config.train, self.per_epoch)

    def _lr(self) -> float:
        return scheduled_rate(self.config.train, step=self.progress.step, train_seconds=self.progress.train_seconds,
                              total_steps=self._total_steps())

    def _log_train(self, window: Window, bar: tqdm) -> None:
        progress, total = self.progress, self._total_steps()
        loss = window.mean_loss if window.steps else None  # every step skipped: no loss, not a perfect 0
        self._log_event("train", loss, window.tokens_per_s, skipped=window.skipped)
        left = time_left(step=progress.step, total_steps=total, train_seconds=progress.train_seconds,
                         max_seconds=self.config.train.max_seconds,
                         seconds_per_step=window.seconds / max(window.steps + window.skipped, 1))
        budget = {"left": duration(left)} if self.config.train.max_seconds is not None and left is not None else {}
        bar.set_postfix(loss="skipped" if loss is None else f"{loss:.3f}", lr=f"{self._lr():.2e}",
                        tok_s=f"{window.tokens_per_s:,.0f}", **budget, refresh=False)
        if self.plain_progress:
            self.echo(progress_line(step=progress.step, total_steps=total, loss=loss, lr=self._lr(),
                                    tokens_per_s=window.tokens_per_s, elapsed_seconds=progress.elapsed_seconds,
                                    left=left, skipped=window.skipped))

    def _evaluate(self) -> float:
        """Validation loss (the mean over the LMs of a `bi` model); writes best.pt on a new best."""
        self.corpus.check_mapped()
        scores = self.validation.score(self.model, self.world, self.device)
        for split, (result, seconds) in scores.items():
            self._log_event(split, result.loss, result.tokens / max(seconds, 1e-9))
        loss = sum(result.loss for result, _ in scores.values()) / len(scores)
        best = self.progress.best_valid_loss
        if math.isfinite(loss) and (best is None or loss < best):  # the same loss, so the same choice, in all
            self.progress.best_valid_loss = loss
            self._write(self.run_dir.save_best)
        parts = [f"{split} loss {result.loss:.4f}, perplexity {result.perplexity:.2f}"
                 for split, (result, _) in scores.items()]
        if len(scores) > 1:  # a bi model: the mean is what picks best.pt, and what the run's end reports
            parts.append(f"mean loss {loss:.4f}")
        marker = " (best)" if self.progress.best_valid_loss == loss else ""
        self.echo(f"step {self.progress.step:,}: " + "; ".join(parts) + marker)
        return loss

    def _log_event(self, split: str, loss: float | None, tokens_per_s: float, skipped: int = 0) -> None:
        if self.metrics is not None:  # process 0
            self.metrics.write(event(step=self.progress.step, split=split, loss=loss, lr=self._lr(),
                                     tokens_per_s=tokens_per_s, elapsed_seconds=self.progress.elapsed_seconds,
                                     threads=self.threads.count, skipped=skipped))

    def _save_last(self) -> None:
        step = self.progress.step
        self._write(lambda payload: self.run_dir.save_last(payload, step))

    def _write(self, save: Callable[[dict], None]) -> None:
        """All processes gather the checkpoint, process 0 saves it; a failed write stops them all. Weights
        that are no longer finite numbers are never written: the run stops, the last good checkpoint kept."""
        if not all(bool(torch.isfinite(parameter).all()) for parameter in self.model.parameters()):
            raise self._everywhere(LmtrainError(
                f"stopped at step {self.progress.step:,}: the weights are no longer finite numbers (NaN or "
                f"infinity), so no checkpoint is written; {self._checkpoints_kept()}; a lower train.lr or "
                f"train.clip may help"))
        payload = checkpoint_payload(config=self.config, tokenizer=self.tokenizer, model=self.model,
                                     optimizer=self.optimizer, progress=self.progress, data_files=self.data_files,
                                     states=self.states, world=self.world, device=self.device)
        run_on_all(self.world, lambda: save(payload) if self.world.is_main else None)

    def _everywhere(self, error: LmtrainError) -> LmtrainError:
        """An error that every process raises at the same step: process 0 alone prints it."""
        return stop_everywhere(error, self.world)


    def _samples(self, count: int) -> list[str]:
        if count == 0 or not self.world.is_main:
            return []
        # A generator of its own, so sampling does not move the training RNG streams (exact resume).
        generator = torch.Generator(device=self.device).manual_seed(self.config.train.seed)
        try:
            return generate(self.model, self.tokenizer, num=count,
                            sentence_start=self.config.data.mode == "sentences", eos=self.config.data.eos,
                            max_tokens=200, generator=generator)
        except NonFiniteOutputs:  # the run itself is done and saved: say why there are no samples, and go on
            self.warn(f"warning: no samples at step {self.progress.step:,}: the model's outputs are not finite numbers "
                      f"(its weights diverged; a lower train.lr or train.clip may help)")
            return []
