"""Loss, perplexity and bits per character.

Perplexity is the exponential of the token-weighted mean negative log-likelihood, every token
counted (`<eos>` included), as in the published PTB results. The sequences evaluated are fixed by
the data (lines, or stream segments of `train.eval_segment` tokens), never by the batch size, so the
number does not depend on `batch_size`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from lmtrain.checkpoint import load_model_and_payload
from lmtrain.config import Config
from lmtrain.data.cache import changed_files, data_fingerprints
from lmtrain.data.dataset import (
    IGNORE,
    InputsTargets,
    length_sorted_batches,
    pad_batch,
    reverse_text,
    sentence_pieces,
    stream_segments,
)
from lmtrain.data.encoding import load_split, split_names, stream_ids, with_corpus_files
from lmtrain.data.tokenizer import Tokenizer, model_remedy, read_text
from lmtrain.errors import LmtrainError
from lmtrain.model.language_model import LanguageModel


def perplexity(loss: float) -> float:
    """exp(mean NLL in nats per token)."""
    return math.inf if loss >= 700 else math.exp(loss)  # NaN stays NaN


def bits_per_character(loss: float) -> float:
    """Nats per character to bits per character."""
    return loss / math.log(2)


def evaluation_sequences(tokenizer: Tokenizer, text: str | Tensor, config: Config) -> list[InputsTargets]:
    """The sequences a split is scored on: its lines (sentences mode) or its stream cut into
    `train.eval_segment`-token segments (stream mode; `text` may be the id stream already)."""
    if config.data.mode == "sentences":
        return sentence_pieces(tokenizer, text, config.train.bptt)
    ids = text if isinstance(text, Tensor) else stream_ids(tokenizer, text)
    return stream_segments(ids, config.train.eval_segment)


@dataclass
class Score:
    loss: float   # mean NLL, nats per token
    tokens: int

    @property
    def perplexity(self) -> float:
        return perplexity(self.loss)


EVAL_BATCH_SIZE = 64       # sequences scored side by side; the result does not depend on it
# Floats held at once per layer for a batch, B x T x max(V, 4H) (16 MB): the logits, or the gate
# activations that a layer's forward keeps for all T steps (4H for the LSTM). Longer inputs go in time
# chunks, with the state carried: the same sums in bounded memory. Still thousands of rows per product.
ACTIVATIONS_BUDGET = 1 << 22


@torch.no_grad()
def score(model: LanguageModel, sequences: list[InputsTargets], *, batch_size: int = EVAL_BATCH_SIZE,
          device: torch.device | str = "cpu", right_to_left: bool = False,
          before_batch: Callable[[], None] = lambda: None) -> Score:
    """Token-weighted mean loss of `model` on `sequences`, each read from a zero state. A long batch
    runs in time chunks with the state carried, which gives the same result in bounded memory.
    `right_to_left`: score the right-to-left LM of a `bi` model (on sequences of reversed text). `before_batch`
    runs before each batch is read (a check that memory-mapped sequences are still whole)."""
    if not batch_size >= 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    lengths = [inputs.numel() for inputs, _ in sequences]
    for batch in length_sorted_batches(lengths, batch_size):
        before_batch()
        inputs, targets = pad_batch([sequences[index] for index in batch])
        # The widest row a token holds at once: its logits, or the gates of its layer (four blocks at most,
        # the LSTM's), a bound for every cell.
        widest = max(model.projection.out_features, 4 * model.projection.in_features)
        chunk = max(1, ACTIVATIONS_BUDGET // (len(batch) * widest))
        state = None
        for start in range(0, inputs.size(1), chunk):
            chunk_targets = targets[:, start:start + chunk].to(device)
            chunk_total, state = model(inputs[:, start:start + chunk].to(device), state, targets=chunk_targets,
                                       ignore_index=IGNORE, right_to_left=right_to_left)
            total += float(chunk_total)
            count += int((chunk_targets != IGNORE).sum())
    model.train(was_training)
    return Score(loss=total / count if count else math.nan, tokens=count)


def report(result: Score, tokenizer: Tokenizer) -> dict[str, float | int]:
    """The numbers `lmtrain eval perplexity` prints (`bpc` only for character models)."""
    numbers: dict[str, float | int] = {"loss": result.loss, "perplexity": result.perplexity}
    if tokenizer.level == "char":
        numbers["bpc"] = bits_per_character(result.loss)
    numbers["tokens"] = result.tokens
    return numbers


WHOLE_TEXT = 1 << 62  # an eval_segment no text reaches: one segment, the state carried through it


def split_changed(saved: dict | None, config: Config, split: str) -> str | None:
    """A warning if the file `split` is read from changed since the checkpoint recorded it (`saved`, its
    `data_files`; none in a checkpoint made by hand): the numbers are then not of the text the run was
    evaluated on. The split's own file, or the one file every split is cut from."""
    if not saved:
        return None
    files = with_corpus_files(config.data)
    role = "path" if files.path is not None else split
    now = data_fingerprints(files, roles=(role,))  # hashing only the file scored: the others may be large
    changes = changed_files({role: saved[role]} if role in saved else {}, now)
    if not changes:
        return None
    how = "cut from it as it is now" if role == "path" else "the file as it is now"
    return f"warning: the corpus changed since the checkpoint: {'; '.join(changes)}; the {split} split scored is {how}"


def evaluate_checkpoint(path: str, *, data_file: str | None = None, split: str = "valid",
                        batch_size: int | None = None, device: str = "cpu",
                        segment: int | None = None) -> tuple[dict[str, float | int], list[str]]:
    """`lmtrain eval perplexity`: score a checkpoint on a file, or on a split of its own corpus.
    `segment` replaces the run's `train.eval_segment` (stream mode); 0 scores the whole text as one
    stream. Returns the numbers and any warnings (e.g. the rate of tokens unseen in training)."""
    if batch_size is not None and not batch_size >= 1:
        raise LmtrainError(f"batch_size must be >= 1; got {batch_size}")
    if segment is not None and not segment >= 0:
        raise LmtrainError(f"segment must be >= 0 (0: the whole text as one stream); got {segment}")
    model, tokenizer, config, payload = load_model_and_payload(path, device)
    warnings = []
    if segment is not None and config.data.mode == "sentences":
        warnings.append("warning: the segment length (--segment) is for stream-mode models: this one reads each "
                        "line from a zero state, as it trained")
    elif segment is not None:
        config = replace(config, train=replace(config.train, eval_segment=segment or WHOLE_TEXT))
    if data_file is not None:
        text = read_text(data_file, encoding=config.data.encoding, errors=config.data.encoding_errors,
                         remedy=model_remedy(config.data.encoding))
        origin = data_file
    else:
        if split not in (names := split_names(config.data)):
            raise LmtrainError(f"the checkpoint's corpus has no {split} split (it has {', '.join(names)}); "
                               f"give --data FILE")
        text, origin = load_split(config.data, split), f"{split} split"
        if changed := split_changed(payload.get("data_files"), config, split):
            warnings.append(changed)
    sequences = evaluation_sequences(tokenizer, text, config)
    if not sequences:
        raise LmtrainError(f"{origin} holds no tokens to evaluate")
    unknown, total = tokenizer.count_unknown(text)
    if unknown:
        warnings.append(f"warning: {unknown} of {total} tokens ({100 * unknown / total:.2f}%) in {origin} are not "
                        f"in the training vocabulary and are scored as <unk>")
    numbers = report(score(model, sequences, batch_size=batch_size or EVAL_BATCH_SIZE, device=device), tokenizer)
    if config.model.direction == "bi":
        reversed_text = reverse_text(text, level=config.data.level, eos=config.data.eos)
        right_to_left = score(model, evaluation_sequences(tokenizer, reversed_text, config),
                         batch_size=batch_size or EVAL_BATCH_SIZE, device=device, right_to_left=True)
        numbers.update({f"right_to_left_{key}": value for key, value in report(right_to_left, tokenizer).items()
                        if key != "tokens"})
        numbers["mean_loss"] = (numbers["loss"] + numbers["right_to_left_loss"]) / 2  # what picks best.pt
    if not all(math.isfinite(value) for key, value in numbers.items() if key.endswith("loss")):
        raise LmtrainError(f"{path}: the model's outputs are not finite numbers (NaN or infinity) on this text: its "
                           f"weights diverged; evaluate another checkpoint (best.pt, an earlier step-*.pt)")
    return numbers, warnings
