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
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from lmtrain.checkpoint import parameter_count
from lmtrain.config import Config, to_yaml
from lmtrain.data.cache import data_fingerprints, load_corpus
from lmtrain.data.dataset import IGNORE, TrainingBatches, check_data_files, line_count, shard_batch, shard_rows
from lmtrain.data.tokenizer import Tokenizer
from lmtrain.errors import LmtrainError, os_reason
from lmtrain.evaluation.perplexity import Score, evaluation_sequences, score
from lmtrain.evaluation.sampling import generate, printable
from lmtrain.files import atomic_write
from lmtrain.model.language_model import LanguageModel, check_size, parameter_estimate
from lmtrain.model.regularization import activation_penalty
from lmtrain.speed import kernels
from lmtrain.speed.memory import available_bytes, keep_freed_memory
from lmtrain.speed.threads import ThreadCount
from lmtrain.training import rng
from lmtrain.training.distributed import (
    World,
    agree_on_step,
    check_batch_size,
    data_parallel,
    from_main,
    gather_objects,
    gather_rows,
    own_rows,
    process_device,
    process_group,
    resolve_device,
    run_on_all,
    sum_over_processes,
    world_from_environment,
)
from lmtrain.training.metrics import Metrics, duration, event, summary_writer_class, time_left
from lmtrain.training.optim import build_optimizer, gradient_norm, learning_rate
from lmtrain.training.resume import Progress, checked_resume, checkpoint_payload
from lmtrain.training.rundir import RunDirectory
from lmtrain.training.signals import StopSignals, TrainingInterrupted  # noqa: F401 - TrainingInterrupted: the API's

# A vocabulary past this gets a warning: the softmax over it then dominates time and memory.
LARGE_VOCABULARY = 200_000

@dataclass
class TrainResult:
    out_dir: Path
    progress: Progress
    valid_loss: float | None
    stopped_by: str
    samples: list[str] = field(default_factory=list)
    model: LanguageModel | None = None   # the trained model, on its device


# train.precision -> the dtype of the training step's matrix products, by torch.autocast around the forward
# (lmtrain/speed/route.py); None: float32.
PRECISIONS: dict[str, torch.dtype | None] = {"float32": None, "bfloat16": torch.bfloat16}


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
        check_data_files(config)
        self.data_files = data_fingerprints(config.data)  # kept in every checkpoint, checked on --resume
        # Only process 0 reads the folder (the machines need not share a disk); it hands the others the checkpoint.
        self.resume_path, payload = from_main(world, self._resume_payload if resume else self._fresh_start)
        # The checkpoint's tokenizer wins on resume; stream mode reads the ids from the token cache.
        corpus = load_corpus(config.data, tokenizer=Tokenizer.from_dict(payload["tokenizer"]) if payload else None,
                             echo=echo, warn=warn)
        self.tokenizer, self.corpus = corpus.tokenizer, corpus
        for line in corpus.unknown_warnings():
            warn(line)
        self._check_sizes(config)
        torch.manual_seed(config.train.seed)
        self.model = LanguageModel.from_config(config.model, self.tokenizer.vocab_size).to(self.device)
        if world.distributed:  # dropout masks of their own in each process, as for different rows in one
            torch.manual_seed(config.train.seed + world.rank)
        self.optimizer = build_optimizer(self.model, config.train)
        # One data view per direction, keyed by "is right to left": the split itself (text or cached ids), and
        # for `direction: bi` the split read right to left for the right-to-left LM.
        self.directions = self.model.directions
        self.batches = {right_to_left: TrainingBatches(
            self.tokenizer, corpus.view("train", right_to_left=right_to_left), mode=config.data.mode,
            batch_size=config.train.batch_size, bptt=config.train.bptt, seed=config.train.seed)
            for right_to_left in self.directions}
        self.per_epoch = self.batches[False].per_epoch
        self.valid = {right_to_left: evaluation_sequences(
            self.tokenizer, corpus.view("valid", right_to_left=right_to_left), config)
            for right_to_left in self.directions}
        if not self.valid[False]:
            raise LmtrainError(
                "the validation split holds no tokens: data.split cuts at line ends, so the file needs more lines "
                "(or give data.train and data.valid)" if config.data.path else f"{config.data.valid} holds no tokens")
        if config.data.eos == "line" and line_count(corpus.splits["train"], self.tokenizer.eos_id) <= 1:
            warn("warning: the training text has no line ends, so with data.eos: line it is one line that ends in "
                 "one <eos>; for text without line structure, data.eos: none")
        self.carries_state = config.data.mode == "stream"
        self.progress, self.states = Progress(), {right_to_left: None for right_to_left in self.directions}
        self.bad_steps = 0  # non-finite steps in a row
        if config.train.tensorboard:
            summary_writer_class()  # missing: say so now, before the run starts
        self.metrics: Metrics | None = None  # process 0's, once `run` opens the folder
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
        self.config = checked_resume(payload, self.config, self.data_files,
                                     allow_changed_data=self.allow_changed_data, warn=self.warn)
        return str(path), payload

    def _restore(self, payload: dict) -> None:
        self.model.load_state_dict(payload["model"])
        self.optimizer.load_state_dict(payload["optimizer"])
        self.progress = Progress.from_checkpoint(payload["progress"])
        for right_to_left, saved in zip(self.directions, payload["stream_states"]):
            # Saved for the global batch: this process takes its rows.
            self.states[right_to_left] = own_rows(self.world, [tuple(t.to(self.device) for t in layer)
                                                               for layer in saved]) if saved else None
        rng.restore(payload, self.device, self.world)
        self.echo(f"resuming {self.resume_path} at step {self.progress.step} (epoch {self.progress.epoch + 1})")

    def _open_run_files(self) -> None:
        """Take the folder's lock, then write config.yaml and open metrics.jsonl."""
        self.run_dir.create()
        self.run_dir.lock()
        try:
            atomic_write(self.out_dir / "config.yaml", to_yaml(self.config).encode())
        except OSError as error:
            raise LmtrainError(f"cannot write to train.out_dir {self.out_dir}: {os_reason(error)}") from None
        self.metrics = Metrics(self.run_dir, resumed_at=self.resumed_at, tensorboard=self.config.train.tensorboard)

    # -- the loop -------------------------------------------------------------------------------

    def run(self, on_start: Callable[[Config], None] | None = None) -> TrainResult:
        self.metrics = None
        keep_freed_memory()  # steps would otherwise fault their large buffers in anew each time
        try:
            run_on_all(self.world, self._open_run_files if self.world.is_main else lambda: None)
            if on_start is not None:
                on_start(self.config)
            if self.device.type == "cpu":  # now, before the clock starts: a first build takes about 30 s
                kernels.load_for_training(bfloat16=self.config.train.precision == "bfloat16", warn=self.warn)
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
            self.run_dir.unlock()

    def _loop(self) -> TrainResult:
        train_config = self.config.train
        self.echo(f"model: {self.config.model.cell} {self.config.model.num_layers}x{self.config.model.hidden_size}, "
                  f"{parameter_count(self.model):,} parameters, vocabulary {self.tokenizer.vocab_size}, "
                  f"{self.per_epoch} batches per epoch, device {self.device}"
                  + (f", {self.threads_line}" if self.device.type == "cpu" else "")
                  + (f", {self.world.size} processes" if self.world.distributed else "")
                  + (", with a right-to-left LM (direction: bi)" if len(self.directions) == 2 else ""))
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
        with StopSignals(second_stops_at_once=not self.world.distributed) as stop:
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
                    raise self._everywhere(stop.interrupted(stop_signal, step=step, written=str(self.run_dir.last),
                                                            resume_command=self._resume_command()))
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
            self.states = {right_to_left: None for right_to_left in self.directions}
        if train_config.max_steps is not None and progress.step >= train_config.max_steps:
            return "max_steps"
        if train_config.max_epochs is not None and progress.epoch >= train_config.max_epochs:
            return "max_epochs"
        if train_config.max_seconds is not None and progress.train_seconds >= train_config.max_seconds:
            return "max_seconds"
        return None

    def _train_step(self, window: dict, stop: StopSignals) -> int | None:
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
        for right_to_left in self.directions:
            batch = self.batches[right_to_left].batch(progress.epoch, progress.batch_index)   # the global batch
            batch_count = int((batch[1] != IGNORE).sum())
            inputs, targets = (t.to(self.device, non_blocking=True)
                               for t in shard_batch(batch, rank=world.rank, world_size=world.size))
            state = self.states[right_to_left]
            if state is not None:
                # Truncated BPTT: keep the state's value, cut the graph to the previous chunk.
                state = [tuple(t.detach() for t in layer) for layer in state]
            product_dtype = PRECISIONS[self.config.train.precision]
            with torch.autocast(self.device.type, dtype=product_dtype, enabled=product_dtype is not None):
                direction_total, state, (a, a_dropped) = self.training_model(
                    inputs, state, targets=targets, ignore_index=IGNORE, right_to_left=right_to_left, hidden=True)
            # The mean over the global batch's tokens. DDP averages the N processes' gradients, so each
            # divides its sum by the global count / N: exact however the padding falls between them.
            penalty = self._activation_penalty(a, a_dropped, targets)
            losses.append(direction_total / (batch_count / world.size) + penalty)
            total, count = total + direction_total.detach(), count + batch_count
            self.states[right_to_left] = state if self.carries_state else None
        loss = sum(losses) / len(losses)  # ELMo: the mean of the two LMs' losses
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()  # under DDP, the gradients are averaged over the processes here
        return total, count

    def _activation_penalty(self, a: torch.Tensor, a_dropped: torch.Tensor, targets: torch.Tensor
                            ) -> torch.Tensor | float:
        """AR and TAR (Merity et al. 2017), over the positions that have a target; 0 when both are off."""
        alpha, beta = self.config.train.activation_regularization, self.config.train.temporal_activation_regularization
        if not (alpha or beta):
            return 0.0
        mask = (targets != IGNORE).to(a.dtype) if self.config.data.mode == "sentences" else None
        return activation_penalty(a, a_dropped, mask, alpha=alpha, beta=beta)

    def _skip_bad_step(self, loss: float, norm: float) -> None:
        """A non-finite loss or gradient: no update, and the carried state (possibly NaN) starts over."""
        self.optimizer.zero_grad(set_to_none=True)
        self.states = {right_to_left: None for right_to_left in self.directions}
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
        for right_to_left in self.directions:
            begin = time.perf_counter()
            result = self._score(right_to_left)
            split = "valid_right_to_left" if right_to_left else "valid"
            self._log_event(split, result.loss, result.tokens / max(time.perf_counter() - begin, 1e-9))
            losses.append(result.loss)
            notes.append(f"{split} loss {result.loss:.4f}, perplexity {result.perplexity:.2f}")
        loss = sum(losses) / len(losses)
        best = self.progress.best_valid_loss
        if math.isfinite(loss) and (best is None or loss < best):  # the same loss, so the same choice, in all
            self.progress.best_valid_loss = loss
            self._write(self.run_dir.save_best)
        marker = " (best)" if self.progress.best_valid_loss == loss else ""
        self.echo(f"step {self.progress.step}: {'; '.join(notes)}{marker}")
        return loss

    def _score(self, right_to_left: bool) -> Score:
        """The validation score; several processes each score a contiguous share and add up the sums.
        (The unwrapped model: DDP's forward would wait for the others' backward pass.)"""
        sequences = self.valid[right_to_left]
        share = sequences[shard_rows(len(sequences), rank=self.world.rank, world_size=self.world.size)]
        result: Score = score(self.model, share, device=self.device, right_to_left=right_to_left,
                              before_batch=self.corpus.check_mapped)
        if not self.world.distributed:
            return result
        mine = torch.tensor([result.loss * result.tokens if result.tokens else 0.0, result.tokens], dtype=torch.float64)
        total, tokens = sum_over_processes(self.world, mine.to(self.device)).tolist()
        return Score(loss=total / tokens if tokens else math.nan, tokens=int(tokens))

    def _log_event(self, split: str, loss: float, tokens_per_s: float) -> None:
        if self.metrics is not None:  # process 0
            self.metrics.write(event(step=self.progress.step, split=split, loss=loss, lr=self._lr(),
                                     tokens_per_s=tokens_per_s, elapsed_seconds=self.progress.elapsed_seconds,
                                     threads=self.threads.count))

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
        return checkpoint_payload(
            config=self.config, tokenizer=self.tokenizer, model=self.model, optimizer=self.optimizer,
            progress=self.progress, data_files=self.data_files,
            stream_states=[gather_rows(self.world, self.states[right_to_left]) for right_to_left in self.directions],
            rng_by_rank=gather_objects(self.world, rng.captured(self.device, self.world)))

    def _samples(self, count: int) -> list[str]:
        if count == 0 or not self.world.is_main:
            return []
        # A generator of its own, so sampling does not move the training RNG streams (exact resume).
        generator = torch.Generator(device=self.device).manual_seed(self.config.train.seed)
        return generate(self.model, self.tokenizer, num=count,
                        sentence_start=self.config.data.mode == "sentences", max_tokens=200, generator=generator)
