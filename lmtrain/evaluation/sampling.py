"""Sampling sentences, as in the lecture: start from a(0) = 0 and x(1) = 0, draw a token from the
softmax, feed it back as the next input, and stop at `<eos>`.

A stream-mode model never saw x = 0; it starts as it was trained, right after an `<eos>`. The
state is carried token to token, so the prefix is never run again.
"""

from __future__ import annotations

import math
import numbers
import unicodedata

import torch
from torch import Tensor

from lmtrain.checkpoint import load_model
from lmtrain.data.tokenizer import ZERO_INPUT, Tokenizer
from lmtrain.errors import LmtrainError
from lmtrain.model.language_model import LanguageModel


def check_options(*, temperature: float, top_k: int | None, top_p: float | None, flags: bool = False) -> None:
    """Raise a clear error for a sampling option out of range, named as the Python argument, or with
    `flags` as `lmtrain sample`'s option (`--top-k`)."""
    name = lambda argument: "--" + argument.replace("_", "-") if flags else argument  # noqa: E731
    if not temperature >= 0:
        raise LmtrainError(f"{name('temperature')} must be >= 0 (0 is greedy); got {temperature}")
    if top_k is not None and top_k < 1:
        raise LmtrainError(f"{name('top_k')} must be >= 1; got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise LmtrainError(f"{name('top_p')} must be in (0, 1]; got {top_p}")


class NonFiniteOutputs(LmtrainError):
    """The model's outputs hold NaN or infinity: its weights diverged."""


GREEDY_BELOW = 1e-30


def sample_next(logits: Tensor, *, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None,
                never: int | None = None) -> Tensor:
    """One token per row of `logits` (B, V) -> (B,).

    temperature 0 (or below GREEDY_BELOW) is greedy (argmax); top_k keeps the k most likely tokens;
    top_p keeps the smallest set whose probabilities reach p (nucleus sampling, Holtzman et al. 2020);
    `never` is a token id not to draw.
    """
    check_options(temperature=temperature, top_k=top_k, top_p=top_p)
    if logits.dim() != 2 or logits.size(1) == 0:
        raise ValueError(f"logits must be (rows, vocabulary size), a row per draw; got shape {tuple(logits.shape)}")
    logits = logits.float()
    # Their float64 sum is finite exactly when every logit is (no float32 values can overflow it): one
    # reduction, cheaper than isfinite().all() at every token.
    if not math.isfinite(float(logits.sum(dtype=torch.float64))):
        raise NonFiniteOutputs("the model's outputs are not finite numbers (NaN or infinity): its weights are "
                           "damaged or diverged; sample from another checkpoint (best.pt, an earlier step-*.pt)")
    if never is not None:
        logits = logits.index_fill(-1, torch.tensor([never], device=logits.device), -math.inf)
    # Below GREEDY_BELOW, logits / temperature would overflow float32 to infinities (NaN after the softmax),
    # and any two logits that differ at all are already a certain choice: that is the greedy draw.
    if temperature < GREEDY_BELOW or top_k == 1:
        return logits.argmax(dim=-1)
    if temperature != 1:
        logits = logits / temperature
    if top_k is not None and top_k < logits.size(-1):
        top = logits.topk(top_k, dim=-1)
        logits = torch.full_like(logits, -torch.inf).scatter(-1, top.indices, top.values)  # exactly k, ties too
    if top_p is not None and top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # Drop a token when the tokens before it already reach p; the most likely one always stays.
        drop = (cumulative - sorted_logits.softmax(dim=-1)) >= top_p
        drop[..., 0] = False  # a p below float32's range would otherwise drop it too (0 >= 1e-300 as float32)
        logits = logits.masked_fill(drop.scatter(-1, order, drop), -torch.inf)
    probabilities = logits.softmax(dim=-1)
    uniform = torch.rand(probabilities.size(0), dtype=torch.float64, device=probabilities.device,
                         generator=generator)
    return inverse_cdf(probabilities, uniform)


def inverse_cdf(probabilities: Tensor, uniform: Tensor) -> Tensor:
    """One token a row of `probabilities` (B, V), not necessarily normalized, from `uniform` (B,) in [0, 1):
    the first token whose cumulative probability passes u times the row's total, so token i with
    probability p_i / sum(p); a token of probability 0 is never drawn.

    One random number a row, where the exponential race (torch.multinomial's one draw) takes one a token,
    which at a word-level vocabulary took most of a sampling step (docs/benchmarks.md, "The draw"). The
    sums are float64, so tens of thousands of float32 probabilities add up without losing the small ones.
    """
    cumulative = probabilities.cumsum(dim=-1, dtype=torch.float64)
    # u < 1 keeps u times the total below the total, rounding included (u <= 1 - 2^-53 takes off more
    # than half the total's last place), so the search always ends on a token of probability above 0.
    target = uniform.view(-1, 1) * cumulative[:, -1:]
    return torch.searchsorted(cumulative, target, right=True).view(-1)


def prime_ids(tokenizer: Tokenizer, prime: str) -> tuple[list[int], int]:
    """The ids of `prime` (no `<eos>` appended) and how many of its tokens are not in the vocabulary
    (they become `<unk>`)."""
    tokens = list(prime) if tokenizer.level == "char" else prime.split()
    ids = [tokenizer.ids.get(token, tokenizer.unk_id) for token in tokens]
    return ids, sum(1 for token in tokens if token not in tokenizer.ids)


def generate(model: LanguageModel, tokenizer: Tokenizer, *, num: int = 1, prime: str = "",
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             max_tokens: int = 200, sentence_start: bool = True, eos: str = "line",
             generator: torch.Generator | None = None) -> list[str]:
    """`num` samples drawn side by side, each until `<eos>` (not included) or `max_tokens` new tokens.

    `sentence_start`: start from the zero input x(1) = 0 (sentences mode); otherwise from `<eos>`.
    `eos`: the model's `data.eos`; with "none" it never saw `<eos>` as a target, which is then never
    drawn, and samples end at `max_tokens`. The prime text is fed first and starts every returned sample.
    """
    rows = draw(model, tokenizer, num=num, prime=prime, temperature=temperature, top_k=top_k, top_p=top_p,
                max_tokens=max_tokens, sentence_start=sentence_start, eos=eos, generator=generator)
    return [_join(tokenizer, prime, _until_eos(row, tokenizer.eos_id)) for row in rows]


@torch.no_grad()
def draw(model: LanguageModel, tokenizer: Tokenizer, *, num: int, prime: str, temperature: float,
         top_k: int | None, top_p: float | None, max_tokens: int, sentence_start: bool,
         generator: torch.Generator | None, eos: str = "line") -> list[list[int]]:
    """The ids `generate` draws, one row per sample, each ending in `<eos>` if it reached one."""
    check_options(temperature=temperature, top_k=top_k, top_p=top_p)
    if eos not in ("line", "none"):
        raise ValueError(f"eos must be line or none (the model's data.eos); got {eos!r}")
    counts = (num, max_tokens)
    if any(isinstance(count, bool) or not isinstance(count, numbers.Integral) or count < 1 for count in counts):
        raise LmtrainError(f"num and max_tokens must be whole numbers >= 1; got {num!r} and {max_tokens!r}")
    if not isinstance(prime, str):
        raise TypeError(f"prime must be a string (\"\" for none); got {type(prime).__name__}")
    if tokenizer.vocab_size != model.embedding.num_embeddings:
        raise LmtrainError(f"the tokenizer has {tokenizer.vocab_size:,} tokens and the model "
                           f"{model.embedding.num_embeddings:,}: they are not from one checkpoint")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    start = ZERO_INPUT if sentence_start else tokenizer.eos_id
    ids, _ = prime_ids(tokenizer, prime)
    inputs = torch.tensor([[start, *ids]], device=device).expand(num, -1)  # (B, 1 + len(prime))
    logits, state = model(inputs)
    logits = logits[:, -1]
    # One token a row from here on: the compiled step with the weights packed once, where it runs.
    step = model.token_step() or (lambda token, state: _last(model(token.unsqueeze(1), state)))
    drawn: list[Tensor] = []
    finished = torch.zeros(num, dtype=torch.bool, device=device)
    for _ in range(max_tokens):
        # With data.eos: none the model was never trained to predict <eos>: it is not drawn.
        token = sample_next(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator,
                            never=tokenizer.eos_id if eos == "none" else None)
        token = token.masked_fill(finished, tokenizer.eos_id)
        drawn.append(token)
        finished |= token == tokenizer.eos_id
        if bool(finished.all()):
            break
        logits, state = step(token, state)
    model.train(was_training)
    return torch.stack(drawn, dim=1).tolist()                               # (B, steps)


def _last(output: tuple[Tensor, list]) -> tuple[Tensor, list]:
    logits, state = output
    return logits[:, -1], state


def _until_eos(row: list[int], eos_id: int) -> list[int]:
    return row[: row.index(eos_id)] if eos_id in row else row


def _join(tokenizer: Tokenizer, prime: str, ids: list[int]) -> str:
    text = tokenizer.decode(ids)
    if tokenizer.level == "word" and prime.strip() and text:
        return f"{prime.rstrip()} {text}"
    return prime + text


# torch.Generator.manual_seed takes a 64-bit seed, signed or unsigned.
SEEDS = (-(1 << 63), (1 << 64) - 1)
# Samples are drawn side by side: this many bytes of (num, V) probabilities at the most (4 GB).
SIDE_BY_SIDE_BYTES = 1 << 32


def check_side_by_side(num: int, vocab_size: int, option: str) -> None:
    """Refuse, naming `option`, more samples than fit side by side: three (num, V) float32 buffers."""
    if num * vocab_size * 4 * 3 > SIDE_BY_SIDE_BYTES:
        raise LmtrainError(f"{option} {num}: the samples are drawn side by side, and {num:,} of them over "
                           f"{vocab_size:,} tokens would need about {num * vocab_size * 12 / 1e9:,.1f} GB; "
                           f"ask for fewer at a time")


def sample_checkpoint(path: str, *, num: int = 1, prime: str = "", temperature: float = 1.0,
                      top_k: int | None = None, top_p: float | None = None, max_tokens: int = 200,
                      seed: int | None = None, device: str = "cpu") -> tuple[list[str], list[str]]:
    """`lmtrain sample`: load a checkpoint and draw `num` samples. Returns (samples, warnings)."""
    check_options(temperature=temperature, top_k=top_k, top_p=top_p, flags=True)
    if seed is not None and not SEEDS[0] <= seed <= SEEDS[1]:
        raise LmtrainError(f"--seed must be a 64-bit integer, from {SEEDS[0]} to {SEEDS[1]}; got {seed}")
    if num < 1 or max_tokens < 1:
        raise LmtrainError(f"--num and --max-tokens must be >= 1; got {num} and {max_tokens}")
    model, tokenizer, config = load_model(path, device)
    check_side_by_side(num, tokenizer.vocab_size, "--num")
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()  # a fresh random seed: different samples each run
    else:
        generator.manual_seed(seed)
    _, unknown = prime_ids(tokenizer, prime)
    warnings = [f"warning: {unknown} token(s) of --prime are not in the vocabulary and are read as <unk>"
                ] if unknown else []
    rows = draw(model, tokenizer, num=num, prime=prime, temperature=temperature, top_k=top_k, top_p=top_p,
                max_tokens=max_tokens, sentence_start=config.data.mode == "sentences", eos=config.data.eos,
                generator=generator)
    if config.data.eos == "line" and not any(tokenizer.eos_id in row for row in rows):
        warnings.append(f"warning: no sample reached <eos> within --max-tokens {max_tokens}: each stopped there (a "
                        f"larger --max-tokens lets them end, unless the model rarely ends a line)")
    return [_join(tokenizer, prime, _until_eos(row, tokenizer.eos_id)) for row in rows], warnings


# Characters a terminal acts on instead of showing: the C0 and C1 controls (CR returns the cursor, ESC
# starts a control sequence) and the bidirectional overrides that reorder what follows (Boucher and
# Anderson 2021, "Trojan Source"). The tab is shown as it is.
_BIDI = frozenset([*range(0x202A, 0x202F), *range(0x2066, 0x206A), 0x200E, 0x200F, 0x061C])


def _escape(char: str) -> str:
    code = ord(char)
    if (code < 0x20 and char != "\t") or 0x7F <= code <= 0x9F:
        return {"\n": "\\n", "\r": "\\r"}.get(char, f"\\x{code:02x}")
    return _code_point(code) if code in _BIDI else char


def _code_point(code: int) -> str:
    """Python's escape of a code point: four hex digits, or eight past U+FFFF (`\\u0301`, `\\U000e0100`)."""
    return f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"


def printable(text: str) -> str:
    """`text` safe to print on one line of a terminal: every control character but the tab, and every
    bidirectional override, written as its escape (`\\r`, `\\n`, `\\x1b`, `\\x00`, `\\u202e`). A
    combining mark right after an escape is escaped too: it would join the escape's last letter
    (`\\u202e` and U+0301 would read `\\u202é`)."""
    parts, after_escape = [], False
    for char in text:
        escaped = _escape(char)
        if escaped == char and after_escape and unicodedata.category(char) in ("Mn", "Mc", "Me"):
            escaped = _code_point(ord(char))
        parts.append(escaped)
        after_escape = escaped != char
    return "".join(parts)

