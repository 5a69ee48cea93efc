"""The shape world split into disjoint class groups, one task per group, a head per task.

Task t classifies the shapes of `groups[t]` with its own linear head (`heads.{t}` of a
`TaskHeads` ResNet); the backbone is shared. Rows are (images, column, task): the column is the
class's logit column in the concatenated heads, and the loss and predictions of a row only read
its task's columns, so a task's data never touches another task's head. Training, selection
and test images are drawn from the world with different seeds: the reported accuracy is on
images no model trained on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from instill.errors import ConfigError
from instill.models import build_model
from instill.tasks.shape_task import ImageTask
from instill.tasks.shapes import MAX_CLASSES, ShapeWorld, make_split
from instill.tasks.task_sequences import Data, TaskOutputs


@dataclass
class ShapeSequenceConfig:
    """The world, its class groups (one task each), the images per class and the ResNet."""

    groups: list[list[int]] = field(default_factory=lambda: [[0, 1], [2, 3], [4, 5], [6, 7]])
    classes: int = 8  # classes of the world (the groups use a subset)
    size: int = 16
    rho: float = 0.9  # probability that an image's texture is its shape's class
    split: str = "natural"
    train_per_class: int = 300
    select_per_class: int = 100
    test_per_class: int = 200
    embedding_size: int = 16
    hidden_sizes: list[int] = field(default_factory=lambda: [16, 32, 64])
    depths: list[int] = field(default_factory=lambda: [1, 1, 1])

    def __post_init__(self) -> None:
        ShapeWorld(self.classes, self.size, self.rho)  # validates the world
        flat = [c for g in self.groups for c in g]
        if len(self.groups) < 2 or any(len(g) < 2 for g in self.groups):
            raise ConfigError(f"shapes.groups needs at least two groups of at least two classes,"
                              f" got {self.groups}")
        if len(set(flat)) != len(flat) or not all(0 <= c < self.classes for c in flat):
            raise ConfigError(f"shapes.groups must be disjoint classes in [0, {self.classes}) "
                              f"(shapes.classes, at most {MAX_CLASSES}), got {self.groups}")
        if self.split not in ("natural", "shape_only"):
            raise ConfigError(f"shapes.split must be natural or shape_only, got {self.split!r}")
        if min(self.train_per_class, self.select_per_class, self.test_per_class) < 1:
            raise ConfigError("shapes.train_per_class, select_per_class and test_per_class "
                              "must be >= 1")


class ShapeSequence:
    """Per-task training, selection and test images of the groups; loss and accuracy read only
    the columns of each row's own task."""

    def __init__(self, cfg: ShapeSequenceConfig, seed: int, device: str = "cpu") -> None:
        self.cfg, self.device = cfg, device
        world = ShapeWorld(cfg.classes, cfg.size, cfg.rho)
        self.names = ["+".join(world.shape_names[c] for c in g) for g in cfg.groups]
        sizes = [len(g) for g in cfg.groups]
        starts = [sum(sizes[:t]) for t in range(len(sizes))]
        column = torch.full((cfg.classes,), -1, dtype=torch.int64)
        owner = torch.full((cfg.classes,), -1, dtype=torch.int64)
        self.allowed = torch.zeros(len(sizes), sum(sizes), dtype=torch.bool, device=device)
        for t, group in enumerate(cfg.groups):
            column[group] = torch.arange(starts[t], starts[t] + sizes[t])
            owner[group] = t
            self.allowed[t, starts[t]:starts[t] + sizes[t]] = True
        self.data = {}
        for offset, (split, per_class) in enumerate([("train", cfg.train_per_class),
                                                     ("select", cfg.select_per_class),
                                                     ("test", cfg.test_per_class)]):
            images = make_split(world, cfg.split, per_class * cfg.classes, seed + offset)
            tasks = owner[images.labels]
            self.data[split] = [(images.images[tasks == t].to(device),
                                 column[images.labels[tasks == t]].to(device),
                                 tasks[tasks == t].to(device)) for t in range(len(sizes))]

    def build(self) -> nn.Module:
        cfg = self.cfg
        return build_model("resnet_heads", head_sizes=[len(g) for g in cfg.groups],
                           embedding_size=cfg.embedding_size,
                           hidden_sizes=tuple(cfg.hidden_sizes),
                           depths=tuple(cfg.depths)).to(self.device)

    def heads(self, task: int) -> tuple[str, ...]:
        return (f"heads.{task}",)

    def untargeted(self) -> list[str]:
        return [f"heads.{t}" for t in range(len(self.cfg.groups))]

    def train(self, task: int) -> Data:
        return self.data["train"][task]

    def pool(self, task: int) -> Data:
        return self.data["train"][task]

    def select(self, task: int) -> Data:
        return self.data["select"][task]

    def test(self, task: int) -> Data:
        return self.data["test"][task]

    def logits(self, model: nn.Module, images: Tensor, tasks: Tensor) -> Tensor:
        """Logits of every row with the columns of other tasks' heads at -inf."""
        logits = model(pixel_values=ImageTask.normalize(images)).float()
        return logits.masked_fill(~self.allowed[tasks], float("-inf"))

    def loss(self, model: nn.Module, batch: Sequence[Tensor]) -> Tensor:
        images, columns, tasks = batch
        return F.cross_entropy(self.logits(model, images, tasks), columns)

    @torch.no_grad()
    def accuracy(self, model: nn.Module, data: Data, batch_size: int = 1024) -> float:
        model.eval()
        hits = sum(int((self.logits(model, x, t).argmax(1) == y).sum())
                   for x, y, t in zip(*(d.split(batch_size) for d in data), strict=True))
        return hits / len(data[0])

    def outputs(self, model: nn.Module, data: Data) -> TaskOutputs | None:
        return None  # task inference is offered on the digits sequences only


__all__ = ["ShapeSequence", "ShapeSequenceConfig"]
