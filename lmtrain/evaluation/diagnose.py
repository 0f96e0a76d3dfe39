"""The lecture's "RNN issues", measured: how much the loss at the last step of a sequence still
depends on the activations far back. For a loss L(T) at the final step, the norm of ∂L(T)/∂a(t) of
the top layer as a function of the distance T - t. Through a vanilla RNN the factor
∂a(t)/∂a(t-1) = W_aaᵀ (1 - a(t)²) repeats once per step, so the norm tends to shrink geometrically
(vanishing gradient, Bengio et al. 1994); the additive memory paths of the GRU and LSTM let it last.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

from lmtrain.checkpoint import load_checkpoint, model_from_checkpoint
from lmtrain.config import load_config
from lmtrain.data.encoding import fit_tokenizer, load_splits, stream_ids
from lmtrain.data.tokenizer import ZERO_INPUT, model_remedy, read_text
from lmtrain.errors import LmtrainError
from lmtrain.evaluation.plots import pyplot, save_figure
from lmtrain.model.language_model import LanguageModel, check_size
from lmtrain.speed.memory import available_bytes


def gradient_by_distance(model: LanguageModel, inputs: Tensor, targets: Tensor) -> list[float]:
    """Mean over the batch of ‖∂L(T)/∂a(t)‖ for the top layer, listed by distance T - t = 0, 1, ...

    inputs, targets: (B, T) token ids; L(T) is the cross-entropy of the last position's target.
    The top layer is run step by step so that every a(t) is a tensor of its own with a gradient.
    """
    was_training = model.training
    model.eval()  # no dropout: the measurement is of the learned maps alone
    x = model.embedding(inputs.clamp(min=0)).masked_fill((inputs == ZERO_INPUT).unsqueeze(-1), 0.0)
    *lower, top = model.rnn.layers
    for layer in lower:
        x, _ = layer(x)
    cell = top.cell
    W_recurrent, W_input, b = cell.stacked_weights()
    x_projected = F.linear(x, W_input, b)                                   # (B, T, G*H)
    state = cell.initial_state(inputs.size(0), device=inputs.device, dtype=x.dtype)
    activations = []
    for x_t in x_projected.unbind(1):
        state = cell.step(x_t, state, W_recurrent)
        state[0].retain_grad()
        activations.append(state[0])                                        # a(t): (B, H)
    logits = model.projection(activations[-1])                              # (B, V)
    F.cross_entropy(logits, targets[:, -1]).backward()
    model.train(was_training)
    norms = [a.grad.norm(dim=1).mean().item() if a.grad is not None else 0.0 for a in activations]
    return norms[::-1]


def windows(ids: Tensor, length: int, count: int, *, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """`count` random windows of `length` steps from an id stream: inputs and targets (count, length)."""
    if ids.numel() < length + 2:
        raise ValueError(f"the text has {ids.numel()} tokens, fewer than --length {length} + 2")
    starts = torch.randint(0, ids.numel() - length - 1, (count,), generator=generator)
    rows = torch.stack([ids[start:start + length + 1] for start in starts.tolist()]).long()
    return rows[:, :-1], rows[:, 1:]


def distances_to_show(length: int) -> list[int]:
    """0, 1, 2, 4, 8, ... up to length - 1: the decay is geometric, so powers of two read best."""
    shown, distance = [0], 1
    while distance < length:
        shown.append(distance)
        distance *= 2
    return shown if shown[-1] == length - 1 else [*shown, length - 1]


def gradient_report(*, checkpoint: str | None = None, config_path: str | None = None, overrides: list[str] = (),
                    data_file: str | None = None, length: int = 64, count: int = 32, seed: int = 0
                    ) -> tuple[str, list[dict[str, float]]]:
    """`lmtrain diagnose gradients`: the decay table for a trained checkpoint or, from a config, a
    freshly initialised model. Windows are drawn from `data_file` or the validation split.
    Returns a description of the model and one row per distance shown."""
    if (checkpoint is None) == (config_path is None):
        raise LmtrainError("give exactly one of --checkpoint and --config")
    if checkpoint is not None and overrides:  # a trained model is what it is: the overrides would be ignored
        raise LmtrainError(f"KEY=VALUE overrides go with --config, not --checkpoint; got {' '.join(overrides)}")
    if length < 2 or count < 1:
        raise LmtrainError(f"--length must be >= 2 and --count >= 1; got {length} and {count}")
    texts = None  # the corpus splits, read at most once
    if checkpoint is not None:
        payload = load_checkpoint(checkpoint)
        model, tokenizer, config = model_from_checkpoint(payload, checkpoint)
        origin = f"{checkpoint} (step {payload.get('progress', {}).get('step', '?')})"
    else:
        config = load_config(config_path, list(overrides))
        texts = load_splits(config.data)
        tokenizer = fit_tokenizer(config.data, texts["train"])
        check_size(config.model, tokenizer.vocab_size, bytes_per_parameter=8, available=available_bytes())
        torch.manual_seed(config.train.seed)
        model, origin = LanguageModel.from_config(config.model, tokenizer.vocab_size), f"{config_path} (untrained)"
    if data_file is not None:
        text = read_text(data_file, encoding=config.data.encoding, remedy=model_remedy(config.data.encoding))
    else:
        text = (texts or load_splits(config.data))["valid"]
    generator = torch.Generator().manual_seed(seed)
    try:
        inputs, targets = windows(stream_ids(tokenizer, text), length, count, generator=generator)
    except ValueError as error:
        raise LmtrainError(str(error)) from None
    norms = gradient_by_distance(model, inputs, targets)
    rows = [{"distance": d, "norm": norms[d], "relative": norms[d] / norms[0] if norms[0] else float("nan")}
            for d in distances_to_show(length)]
    model_config = config.model
    description = (f"{origin}: {model_config.cell} {model_config.num_layers}x{model_config.hidden_size}, "
                   f"{count} windows of {length} tokens")
    return description, rows


def plot_rows(curves: dict[str, list[dict[str, float]]], path: str) -> None:
    """Relative gradient norm against distance, log scale, one curve per model."""
    plt = pyplot()
    figure, axes = plt.subplots(figsize=(6, 4))
    for name, rows in curves.items():
        axes.plot([r["distance"] for r in rows], [r["relative"] for r in rows], marker="o", label=name)
    axes.set(xlabel="distance T - t", ylabel="‖∂L(T)/∂a(t)‖ / ‖∂L(T)/∂a(T)‖", yscale="log",
             title="How far back the gradient reaches")
    axes.legend()
    figure.tight_layout()
    save_figure(plt, figure, path)
