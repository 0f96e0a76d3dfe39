"""The validation split as a run scores it: every LM of the model on its own view of the split, and
under several processes each scoring a contiguous share, the sums added up."""

from __future__ import annotations

import math
import time

import torch

from lmtrain.config import Config
from lmtrain.data.cache import Corpus
from lmtrain.data.dataset import shard_rows
from lmtrain.errors import LmtrainError
from lmtrain.evaluation.perplexity import Score, evaluation_sequences, score
from lmtrain.model.language_model import LanguageModel
from lmtrain.training.distributed import World, sum_over_processes


class Validation:
    def __init__(self, corpus: Corpus, config: Config, directions: tuple[bool, ...]) -> None:
        """The sequences of the validation split, one list per LM of the model (`directions`)."""
        self.corpus, self.directions = corpus, directions
        self.sequences = [evaluation_sequences(corpus.tokenizer, corpus.view("valid", right_to_left=right_to_left),
                                               config) for right_to_left in directions]
        if not self.sequences[0]:
            raise LmtrainError(
                "the validation split holds no tokens: data.split cuts at line ends, so the file needs more lines "
                "(or give data.train and data.valid)" if config.data.path else f"{config.data.valid} holds no tokens")

    def score(self, model: LanguageModel, world: World, device: torch.device) -> dict[str, tuple[Score, float]]:
        """{"valid": (score, seconds)[, "valid_right_to_left": the right-to-left LM's]}. Call it in every
        process at once. (The unwrapped model: DDP's forward would wait for the others' backward pass.)"""
        scores = {}
        for right_to_left, sequences in zip(self.directions, self.sequences, strict=True):
            begin = time.perf_counter()
            result = self._score(model, sequences, right_to_left, world, device)
            scores["valid_right_to_left" if right_to_left else "valid"] = result, time.perf_counter() - begin
        return scores

    def _score(self, model: LanguageModel, sequences: list, right_to_left: bool, world: World,
               device: torch.device) -> Score:
        share = sequences[shard_rows(len(sequences), rank=world.rank, world_size=world.size)]
        result = score(model, share, device=device, right_to_left=right_to_left, before_batch=self.corpus.check_mapped)
        if not world.distributed:
            return result
        mine = torch.tensor([result.loss * result.tokens if result.tokens else 0.0, result.tokens], dtype=torch.float64)
        total, tokens = sum_over_processes(world, mine.to(device)).tolist()
        return Score(loss=total / tokens if tokens else math.nan, tokens=int(tokens))
