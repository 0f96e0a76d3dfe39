"""What a training step minimises, for every language model inside a `LanguageModel`.

    loss = mean over the LMs of ( Σ_t −log ŷ(t)[y(t)] / tokens  +  α AR + β TAR )

One LM reads left to right; `direction: bi` adds ELMo's right-to-left LM (Peters et al. 2018), and the
loss is the mean of the two. Each LM reads its own view of the text (the right-to-left one the text
reversed), so each gets its own batch and carries its own state. AR and TAR: Merity et al. 2017
(`regularization.activation_penalty`).

The objective is an `nn.Module` around the model so that both LMs run in one forward call, the call
that DistributedDataParallel wraps.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from lmtrain.model.language_model import LanguageModel
from lmtrain.model.regularization import activation_penalty

State = list[tuple[Tensor, ...]]

# train.precision -> the dtype of the training step's matrix products, by torch.autocast around the model's
# forward (lmtrain/speed/route.py); None: float32.
PRECISIONS: dict[str, torch.dtype | None] = {"float32": None, "bfloat16": torch.bfloat16}


class Objective(nn.Module):
    def __init__(self, model: LanguageModel, *, ignore_index: int, activation_regularization: float = 0.0,
                 temporal_activation_regularization: float = 0.0, padded: bool = False) -> None:
        """`ignore_index`: the target id of no token (padding), left out of the loss; `padded`: batches of
        padded sentences, whose padding AR and TAR leave out too."""
        super().__init__()
        self.model, self.ignore_index, self.padded = model, ignore_index, padded
        self.alpha, self.beta = activation_regularization, temporal_activation_regularization

    def forward(self, batches: Sequence[tuple[Tensor, Tensor]], states: Sequence[State | None],
                tokens: Sequence[float], precision: str = "float32") -> tuple[Tensor, Tensor, list[State]]:
        """One (inputs, targets) batch, carried state (None: a(0) = 0) and token count (what its summed
        NLL is divided by) per LM, in `model.directions` order. Returns the loss, the LMs' summed NLL
        (detached) and their new states."""
        product_dtype = PRECISIONS[precision]
        losses, summed, new_states = [], 0.0, []
        for right_to_left, (inputs, targets), state, count in zip(self.model.directions, batches, states, tokens,
                                                                  strict=True):
            with torch.autocast(inputs.device.type, dtype=product_dtype, enabled=product_dtype is not None):
                nll, state, (a, a_dropped) = self.model(inputs, state, targets=targets, ignore_index=self.ignore_index,
                                                        right_to_left=right_to_left, hidden=True)
            losses.append(nll / count + self._penalty(a, a_dropped, targets))
            summed, new_states = summed + nll.detach(), [*new_states, state]
        return sum(losses) / len(losses), summed, new_states

    def _penalty(self, a: Tensor, a_dropped: Tensor, targets: Tensor) -> Tensor | float:
        """AR and TAR over the positions that have a target; 0 when both are off."""
        if not (self.alpha or self.beta):
            return 0.0
        mask = (targets != self.ignore_index).to(a.dtype) if self.padded else None
        return activation_penalty(a, a_dropped, mask, alpha=self.alpha, beta=self.beta)
