"""Arithmetic task sequences for continual learning: rows `[TASK_t, a, b, SEP, y]`.

The tasks of a sequence share one vocabulary (numbers 0..numbers-1, SEP, then one token per task)
and one output layer (answers y < modulus reuse the number tokens); the leading task token says
which expression to compute, so one model serves every task without a per-task head.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from instill.errors import ConfigError
from instill.models import logits_of
from instill.tasks.arithmetic import ArithmeticSpec, make_sequences
from instill.tasks.expr import Expression, parse


@dataclass(frozen=True)
class TaskTokenSpec:
    """Sizes of a task-token sequence: the arithmetic spec and how many tasks share it."""

    numbers: int
    modulus: int
    tasks: int

    def __post_init__(self) -> None:
        ArithmeticSpec(self.numbers, self.modulus)  # validates numbers and modulus
        if self.tasks < 1:
            raise ConfigError(f"a task sequence needs at least one task, got {self.tasks}")

    @property
    def arithmetic(self) -> ArithmeticSpec:
        return ArithmeticSpec(self.numbers, self.modulus)

    @property
    def vocab_size(self) -> int:
        """Number tokens, SEP and one token per task."""
        return self.numbers + 1 + self.tasks

    def task_token(self, task: int) -> int:
        if not 0 <= task < self.tasks:
            raise ValueError(f"task must be in [0, {self.tasks}), got {task}")
        return self.numbers + 1 + task


def all_pairs(numbers: int) -> tuple[Tensor, Tensor]:
    """Every ordered pair (a, b) of 0..numbers-1, in a fixed order."""
    grid = torch.cartesian_prod(torch.arange(numbers), torch.arange(numbers))
    return grid[:, 0], grid[:, 1]


def task_sequences(a: Tensor, b: Tensor, expr: Expression | str, task: int,
                   spec: TaskTokenSpec) -> Tensor:
    """Rows `[TASK_task, a, b, SEP, expr(a, b) mod p]` (int64, shape [n, 5])."""
    body = make_sequences(a, b, parse(expr) if isinstance(expr, str) else expr, spec.arithmetic)
    token = torch.full((len(a), 1), spec.task_token(task), dtype=torch.int64)
    return torch.cat([token, body], dim=1)


class TaskTokenTask:
    """Loss and accuracy of `[TASK, a, b, SEP, y]` rows: the answer is read at SEP (index 3)."""

    def loss(self, model: nn.Module, batch: Sequence[Tensor]) -> Tensor:
        """Cross-entropy of the answer only (the output head runs at the SEP position only)."""
        (seqs,) = batch
        logits = logits_of(model(input_ids=seqs[:, :4], logits_to_keep=1))[:, -1]
        return F.cross_entropy(logits.float(), seqs[:, 4])

    @torch.no_grad()
    def predict(self, model: nn.Module, seqs: Tensor, batch_size: int = 4096) -> Tensor:
        """Argmax over the vocabulary at the SEP position, in eval mode."""
        model.eval()
        outs = [logits_of(model(input_ids=chunk[:, :4], logits_to_keep=1))[:, -1].argmax(-1)
                for chunk in seqs.split(batch_size)]
        return torch.cat(outs)

    def accuracy(self, model: nn.Module, seqs: Tensor) -> float:
        return (self.predict(model, seqs) == seqs[:, 4]).float().mean().item()


__all__ = ["TaskTokenSpec", "TaskTokenTask", "all_pairs", "task_sequences"]
