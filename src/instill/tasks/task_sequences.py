"""Task sequences for continual learning: the interface every sequence gives the experiment
(`TaskSequence`), the arithmetic sequence of rows `[TASK_t, a, b, SEP, y]`, and the replay
buffer drawn from earlier tasks.

The arithmetic tasks share one vocabulary (numbers 0..numbers-1, SEP, then one token per task)
and one output layer (answers y < modulus reuse the number tokens); the leading task token says
which expression to compute, so one model serves every task without a per-task head.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from instill.errors import ConfigError
from instill.models import build_model, logits_of
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


Data = tuple[Tensor, ...]  # the tensors of one data set, batched along dim 0 together


@dataclass(frozen=True)
class TaskOutputs:
    """Every task's head on the same inputs, for inferring the task (SupSup): `logits`
    [n, tasks, width], and each row's label in its own task's head ([n])."""

    logits: Tensor
    labels: Tensor


class TaskSequence(Protocol):
    """What a continual experiment needs of a task sequence; it knows nothing of methods."""

    names: list[str]  # one short label per task

    def build(self) -> nn.Module:
        """A freshly initialized model for every task of the sequence."""

    def heads(self, task: int) -> tuple[str, ...]:
        """Module names of task `task`'s own head (empty when tasks share the output)."""

    def untargeted(self) -> list[str]:
        """Module names never put in an allocation (every task's head)."""

    def train(self, task: int) -> Data:
        """One epoch of task `task`'s training data."""

    def pool(self, task: int) -> Data:
        """Task `task`'s distinct training examples (what a replay buffer draws from)."""

    def select(self, task: int) -> Data:
        """Data for model selection and the gates."""

    def test(self, task: int) -> Data:
        """Data of the reported accuracy matrix."""

    def loss(self, model: nn.Module, batch: Sequence[Tensor]) -> Tensor: ...

    def accuracy(self, model: nn.Module, data: Data) -> float: ...

    def outputs(self, model: nn.Module, data: Data) -> TaskOutputs | None:
        """Every task's head on `data`'s inputs, or None when the tasks' outputs differ in
        form (no task inference)."""


class ArithmeticSequence:
    """Arithmetic expressions mod p with a task token; accuracy over every pair of a task
    (a memorized table: `select` and `test` are the same pairs the task trains on)."""

    def __init__(self, sequence: Sequence[str], numbers: int, modulus: int, repeat: int,
                 model: dict[str, Any], device: str = "cpu") -> None:
        self.names, self.spec = list(sequence), TaskTokenSpec(numbers, modulus, len(sequence))
        self.model, self.device, self.task = dict(model), device, TaskTokenTask()
        a, b = all_pairs(numbers)
        self.evals = [task_sequences(a, b, parse(e), t, self.spec).to(device)
                      for t, e in enumerate(sequence)]
        self.repeat = repeat

    def build(self) -> nn.Module:
        return build_model("gpt2", vocab_size=self.spec.vocab_size, n_positions=5,
                           **self.model).to(self.device)

    def heads(self, task: int) -> tuple[str, ...]:
        return ()

    def untargeted(self) -> list[str]:
        return []

    def train(self, task: int) -> Data:
        return (self.evals[task].repeat(self.repeat, 1),)

    def pool(self, task: int) -> Data:
        return (self.evals[task],)

    def select(self, task: int) -> Data:
        return (self.evals[task],)

    def test(self, task: int) -> Data:
        return (self.evals[task],)

    def loss(self, model: nn.Module, batch: Sequence[Tensor]) -> Tensor:
        return self.task.loss(model, batch)

    def accuracy(self, model: nn.Module, data: Data) -> float:
        return self.task.accuracy(model, data[0])

    def outputs(self, model: nn.Module, data: Data) -> TaskOutputs | None:
        return None  # the task token is the input: there is no task to infer


def replay_buffer(pools: Sequence[Data], size: int, seed: int) -> tuple[Data, Tensor]:
    """`size` examples drawn without replacement from the pools of earlier tasks, split as
    evenly as the pools allow (the earliest get the remainder); the buffer and each
    example's task. A pool smaller than its share gives all it has."""
    if not pools:
        raise ConfigError("a replay buffer needs at least one earlier task")
    gen = torch.Generator().manual_seed(seed)
    share = [size // len(pools) + (i < size % len(pools)) for i in range(len(pools))]
    parts, owners = [], []
    for task, (pool, k) in enumerate(zip(pools, share, strict=True)):
        index = torch.randperm(len(pool[0]), generator=gen)[:k].to(pool[0].device)
        parts.append(tuple(t[index] for t in pool))
        owners.append(torch.full((len(index),), task, dtype=torch.int64))
    data = tuple(torch.cat(column) for column in zip(*parts, strict=True))
    return data, torch.cat(owners)


__all__ = ["ArithmeticSequence", "Data", "TaskOutputs", "TaskSequence", "TaskTokenSpec",
           "TaskTokenTask", "all_pairs", "replay_buffer", "task_sequences"]
