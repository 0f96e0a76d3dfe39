"""The training loop: truncated BPTT (stream) or padded sentences, gradient clipping, evaluation,
checkpoints, exact resume.

Files in `train.out_dir`: `config.yaml` (the resolved config), `metrics.jsonl` (one JSON object per
log and evaluation event), `last.pt` (every `checkpoint_every` steps and at the end), `best.pt`
(lowest finite validation loss). Stopping: whichever of max_steps, max_epochs and max_seconds
(training time, evaluation excluded) comes first. Ctrl-C or SIGTERM finish the current step, write
`last.pt` and stop; `--resume` continues exactly where the run left off.
"""

from __future__ import annotations

import json
import math
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from lmtrain.checkpoint import atomic_write_bytes, load_checkpoint, parameter_count, save_checkpoint
from lmtrain.config import Config, differences, from_dict, get_value, to_dict, to_yaml
from lmtrain.data import TrainingBatches, fit_tokenizer, load_splits
from lmtrain.errors import LmtrainError
from lmtrain.evaluate import Score, evaluation_sequences, perplexity, score, summed_nll
from lmtrain.model import LanguageModel
from lmtrain.optim import build_optimizer, learning_rate
from lmtrain.sampling import generate
from lmtrain.tokenizer import Tokenizer

# Keys a resumed run may change: how long to go on and how to report, not what is learned.
RESUMABLE = ("train.max_steps", "train.max_epochs", "train.max_seconds", "train.eval_every", "train.log_every",
             "train.checkpoint_every", "train.final_samples", "train.device", "train.out_dir")


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
          progress_bar: bool = True) -> TrainResult:
    """Train (or with `resume`, continue training) the model that `config` describes."""
    return Trainer(config, resume=resume, echo=echo, progress_bar=progress_bar).run()


class Trainer:
    def __init__(self, config: Config, *, resume: bool, echo: Callable[[str], None], progress_bar: bool) -> None:
        self.config, self.echo, self.progress_bar = config, echo, progress_bar
        self.device = resolve_device(config.train.device)
        self.out_dir = Path(config.train.out_dir)
        self.last_path, self.best_path = self.out_dir / "last.pt", self.out_dir / "best.pt"
        payload = self._resume_payload() if resume else self._fresh_start()
        texts = load_splits(config.data)
        self.tokenizer = (Tokenizer.from_dict(payload["tokenizer"]) if payload
                          else fit_tokenizer(config.data, texts["train"]))
        self._warn_unknown(texts)
        torch.manual_seed(config.train.seed)
        self.model = LanguageModel.from_config(config.model, self.tokenizer.vocab_size).to(self.device)
        self.optimizer = build_optimizer(self.model, config.train)
        self.batches = TrainingBatches(self.tokenizer, texts["train"], mode=config.data.mode,
                                       batch_size=config.train.batch_size, bptt=config.train.bptt, seed=config.train.seed)
        self.valid = evaluation_sequences(self.tokenizer, texts["valid"], config)
        if not self.valid:
            raise LmtrainError("the validation split holds no tokens (a larger data.split fraction or another data.valid?)")
        self.progress, self.state = Progress(), None
        if payload:
            self._restore(payload)
        self._write_run_files(appending=bool(payload))

    def _fresh_start(self) -> None:
        # Never overwrite a run's checkpoints by starting again in its folder.
        if self.last_path.exists():
            raise LmtrainError(f"{self.out_dir} already holds a run (last.pt): add --resume to continue it, "
                               f"or choose another train.out_dir")

    def _resume_payload(self) -> dict:
        if not self.last_path.exists():
            raise LmtrainError(f"nothing to resume: no last.pt in {self.out_dir}")
        payload = load_checkpoint(self.last_path)
        saved = from_dict(payload["config"])
        changed = differences(saved, self.config, ignore=RESUMABLE)
        if changed:
            raise LmtrainError("--resume: the config differs from the run's in " + ", ".join(
                f"{key} ({get_value(saved, key)!r} -> {get_value(self.config, key)!r})" for key in changed))
        return payload

    def _restore(self, payload: dict) -> None:
        self.model.load_state_dict(payload["model"])
        self.optimizer.load_state_dict(payload["optimizer"])
        self.progress = Progress(**payload["progress"])
        saved_state = payload.get("stream_state")
        self.state = [tuple(t.to(self.device) for t in layer) for layer in saved_state] if saved_state else None
        torch.set_rng_state(payload["rng"]["torch"])
        if self.device.type == "cuda" and payload["rng"].get("cuda"):
            torch.cuda.set_rng_state_all(payload["rng"]["cuda"])
        self.echo(f"resuming {self.last_path} at step {self.progress.step} (epoch {self.progress.epoch + 1})")

    def _write_run_files(self, *, appending: bool) -> None:
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(self.out_dir / "config.yaml", to_yaml(self.config).encode())
            self.metrics = open(self.out_dir / "metrics.jsonl", "a" if appending else "w", encoding="utf-8")
        except OSError as error:
            raise LmtrainError(f"cannot write to train.out_dir {self.out_dir}: {error.strerror or error}") from None

    def _warn_unknown(self, texts: dict[str, str]) -> None:
        for split in ("valid", "test"):
            if split in texts:
                unknown, total = self.tokenizer.count_unknown(texts[split])
                if unknown:
                    self.echo(f"warning: {unknown} of {total} {split} tokens ({100 * unknown / max(total, 1):.2f}%) "
                              f"are not in the training vocabulary and count as <unk>")

    # -- the loop -------------------------------------------------------------------------------

    def run(self) -> TrainResult:
        train_config = self.config.train
        self.echo(f"model: {self.config.model.cell} {self.config.model.num_layers}x{self.config.model.hidden_size}, "
                  f"{parameter_count(self.model):,} parameters, vocabulary {self.tokenizer.vocab_size}, "
                  f"{self.batches.per_epoch} batches per epoch, device {self.device}")
        total = self._total_steps()
        bar = tqdm(total=total, initial=self.progress.step, disable=not self.progress_bar, unit="step",
                   dynamic_ncols=True)
        echo, self.echo = self.echo, (lambda line: bar.write(line)) if self.progress_bar else self.echo
        window = {"loss": torch.zeros((), device=self.device), "tokens": 0, "seconds": 0.0, "steps": 0}
        valid_loss, last_eval_step = None, -1
        started = time.perf_counter() - self.progress.elapsed_seconds
        with _StopSignals() as stop:
            while (reason := self._limit_reached()) is None:
                self._train_step(window)
                self.progress.elapsed_seconds = time.perf_counter() - started
                step = self.progress.step
                bar.update(1)
                if step % train_config.log_every == 0:
                    self._log_train(window, bar)
                if step % train_config.eval_every == 0:
                    valid_loss, last_eval_step = self._evaluate(), step
                if step % train_config.checkpoint_every == 0:
                    self._save(self.last_path)
                if stop.signal is not None:
                    self._save(self.last_path)
                    bar.close()
                    raise TrainingInterrupted(
                        f"stopped by {signal.Signals(stop.signal).name} at step {step}; {self.last_path} written; "
                        f"continue with: lmtrain train {self.out_dir / 'config.yaml'} --resume", 128 + stop.signal)
        if last_eval_step != self.progress.step:
            valid_loss = self._evaluate()
        self._save(self.last_path)
        bar.close()
        self.echo = echo
        self.metrics.close()
        samples = self._final_samples()
        return TrainResult(self.out_dir, self.progress, valid_loss, reason, samples)

    def _total_steps(self) -> int | None:
        limits = [self.config.train.max_steps,
                  self.config.train.max_epochs and self.config.train.max_epochs * self.batches.per_epoch]
        return min((limit for limit in limits if limit), default=None)

    def _limit_reached(self) -> str | None:
        train_config, progress = self.config.train, self.progress
        if progress.batch_index >= self.batches.per_epoch:
            progress.epoch, progress.batch_index, self.state = progress.epoch + 1, 0, None
        if train_config.max_steps is not None and progress.step >= train_config.max_steps:
            return "max_steps"
        if train_config.max_epochs is not None and progress.epoch >= train_config.max_epochs:
            return "max_epochs"
        if train_config.max_seconds is not None and progress.train_seconds >= train_config.max_seconds:
            return "max_seconds"
        return None

    def _train_step(self, window: dict) -> None:
        train_config, progress = self.config.train, self.progress
        begin = time.perf_counter()
        inputs, targets = (t.to(self.device, non_blocking=True) for t in self.batches.batch(progress.epoch, progress.batch_index))
        if self.batches.carries_state and self.state is not None:
            # Truncated BPTT: keep the state's value, cut the graph to the previous chunk.
            self.state = [tuple(t.detach() for t in layer) for layer in self.state]
        lr = self._lr()
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.train()
        logits, state = self.model(inputs, self.state if self.batches.carries_state else None)
        total, count = summed_nll(logits, targets)
        loss = total / count
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if train_config.clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), train_config.clip)
        self.optimizer.step()
        self.state = state if self.batches.carries_state else None
        progress.step, progress.batch_index, progress.tokens = progress.step + 1, progress.batch_index + 1, progress.tokens + count
        window["loss"] += total.detach()
        window["tokens"] += count
        window["steps"] += 1
        seconds = time.perf_counter() - begin
        window["seconds"] += seconds
        progress.train_seconds += seconds

    def _lr(self) -> float:
        c = self.config.train
        return learning_rate(self.progress.step, lr=c.lr, schedule=c.schedule, warmup_steps=c.warmup_steps,
                             total_steps=self._total_steps(), min_lr=c.min_lr)

    def _log_train(self, window: dict, bar: tqdm) -> None:
        loss = float(window["loss"]) / max(window["tokens"], 1)
        tokens_per_s = window["tokens"] / max(window["seconds"], 1e-9)
        self._log_event("train", loss, tokens_per_s)
        bar.set_postfix(loss=f"{loss:.3f}", lr=f"{self._lr():.2e}", tok_s=f"{tokens_per_s:,.0f}", refresh=False)
        window.update(loss=torch.zeros((), device=self.device), tokens=0, seconds=0.0, steps=0)

    def _evaluate(self) -> float:
        begin = time.perf_counter()
        result: Score = score(self.model, self.valid, device=self.device)
        self._log_event("valid", result.loss, result.tokens / max(time.perf_counter() - begin, 1e-9))
        best = self.progress.best_valid_loss
        if math.isfinite(result.loss) and (best is None or result.loss < best):
            self.progress.best_valid_loss = result.loss
            self._save(self.best_path)
        self.echo(f"step {self.progress.step}: valid loss {result.loss:.4f}, perplexity {result.perplexity:.2f}"
                  + (" (best)" if self.progress.best_valid_loss == result.loss else ""))
        return result.loss

    def _log_event(self, split: str, loss: float, tokens_per_s: float) -> None:
        event = {"step": self.progress.step, "split": split, "loss": round(loss, 6),
                 "ppl": round(perplexity(loss), 4), "lr": self._lr(), "tokens_per_s": round(tokens_per_s, 1),
                 "elapsed_s": round(self.progress.elapsed_seconds, 3)}
        self.metrics.write(json.dumps(event) + "\n")
        self.metrics.flush()

    def _save(self, path: Path) -> None:
        rng = {"torch": torch.get_rng_state(),
               "cuda": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else []}
        save_checkpoint(path, {
            "config": to_dict(self.config), "tokenizer": self.tokenizer.to_dict(),
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "progress": asdict(self.progress), "rng": rng,
            "stream_state": [tuple(layer) for layer in self.state] if self.state is not None else None})

    def _final_samples(self) -> list[str]:
        if self.config.train.final_samples == 0:
            return []
        # A generator of its own, so sampling does not move the training RNG streams.
        generator = torch.Generator(device=self.device).manual_seed(self.config.train.seed)
        return generate(self.model, self.tokenizer, num=self.config.train.final_samples,
                        sentence_start=self.config.data.mode == "sentences", max_tokens=200, generator=generator)


class _StopSignals:
    """While training, SIGINT and SIGTERM only set a flag; the loop stops after the current step."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> _StopSignals:
        if threading.current_thread() is threading.main_thread():
            for number in (signal.SIGINT, signal.SIGTERM):
                self._previous[number] = signal.signal(number, self._handle)
        return self

    def _handle(self, number: int, frame: object) -> None:
        if self.signal is not None:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.signal = number

    def __exit__(self, *exc_info: object) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
