"""The arithmetic task's loss and predictions for `[a, b, SEP, y]` sequences."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from instill.models import logits_of
from instill.tasks.arithmetic import ArithmeticSpec


class SequenceTask:
    """Loss and accuracy for `[a, b, SEP, y]` sequences (answer read at the SEP position)."""

    def __init__(self, spec: ArithmeticSpec, loss: str) -> None:
        self.spec, self.loss_kind = spec, loss

    def loss(self, model: nn.Module, batch: Sequence[Tensor]) -> Tensor:
        """Causal LM loss on the whole sequence (`lm`, the paper's), or on the answer only
        (the output head then runs only at the SEP position)."""
        (seqs,) = batch
        if self.loss_kind == "answer":
            logits = logits_of(model(input_ids=seqs[:, :3], logits_to_keep=1))[:, -1]
            return F.cross_entropy(logits.float(), seqs[:, 3])
        logits = logits_of(model(input_ids=seqs))[:, :-1]
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(),
                               seqs[:, 1:].reshape(-1))

    @torch.no_grad()
    def predict(self, model: nn.Module, seqs: Tensor, batch_size: int = 4096) -> Tensor:
        """Argmax over the vocabulary at the SEP position."""
        model.eval()
        outs = [logits_of(model(input_ids=chunk[:, :3], logits_to_keep=1))[:, -1].argmax(-1)
                for chunk in seqs.split(batch_size)]
        return torch.cat(outs)

    def accuracy(self, model: nn.Module, seqs: Tensor) -> float:
        return (self.predict(model, seqs) == seqs[:, 3]).float().mean().item()

    def score(self, model: nn.Module, batch: Sequence[Tensor]) -> Tensor:
        """`accuracy` as a tensor, functionally (for a vmapped stack of models)."""
        (seqs,) = batch
        logits = logits_of(model(input_ids=seqs[:, :3], logits_to_keep=1))[:, -1]
        return (logits.argmax(-1) == seqs[:, 3]).float().mean()
