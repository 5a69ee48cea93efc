"""Split and permuted digits: the field's standard continual sequences on real images.

The images are scikit-learn's handwritten digits (`load_digits`: 1,797 real 8x8 images of ten
classes, shipped with the package, no download) or any class-per-folder image tree on disk
(`image_dir`, e.g. MNIST or CIFAR-10 written out as PNGs; `tasks.images.load_image_folder`).
Each class is split once into training, selection and test images (`split_seed`, the same
for every replicate), so every reported accuracy is on held-out images.

- `split` (Split-MNIST's protocol): task t classifies the classes of `groups[t]`.
- `permuted` (Permuted-MNIST's protocol): task t classifies all classes with the pixels of
  every image shuffled by task t's own fixed permutation.

Rows are (images, label, task): the label indexes task t's own head (`heads.{t}` of an
`MLPHeads` model), and loss and predictions read only that head (task-incremental learning).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from instill.errors import ConfigError
from instill.models import build_model
from instill.tasks.task_sequences import Data, TaskOutputs

PROTOCOLS = ("split", "permuted")


@dataclass
class DigitSequenceConfig:
    """Where the images come from, how they become tasks, the held-out split and the MLP."""

    image_dir: str | None = None  # class-per-folder images; None: scikit-learn's load_digits
    image_size: int = 8  # side an image_dir's images are resized to (load_digits is 8x8)
    groups: list[list[int]] = field(
        default_factory=lambda: [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]])  # split: one task each
    permutations: int = 5  # permuted: how many tasks (each its own pixel permutation)
    select_fraction: float = 0.15  # of each class: images that choose epochs and feed gates
    test_fraction: float = 0.25  # of each class: images only the reported accuracy sees
    split_seed: int = 0  # the held-out split and the permutations (the same for every replicate)
    hidden: list[int] = field(default_factory=lambda: [512, 512])  # wide: SupSup's random net

    def __post_init__(self) -> None:
        flat = [c for g in self.groups for c in g]
        if len(self.groups) < 2 or any(len(g) < 2 for g in self.groups):
            raise ConfigError(f"digits.groups needs at least two groups of at least two "
                              f"classes, got {self.groups}")
        if len({len(g) for g in self.groups}) != 1 or len(set(flat)) != len(flat):
            raise ConfigError(f"digits.groups must be disjoint groups of the same size (one "
                              f"head width for every task), got {self.groups}")
        if self.permutations < 2:
            raise ConfigError(f"digits.permutations must be >= 2, got {self.permutations}")
        if not (self.select_fraction > 0 and self.test_fraction > 0
                and self.select_fraction + self.test_fraction < 1):
            raise ConfigError("digits.select_fraction and test_fraction must be > 0 and leave "
                              f"training images (sum < 1), got {self.select_fraction}, "
                              f"{self.test_fraction}")
        if self.image_size < 2 or not self.hidden or min(self.hidden) < 1:
            raise ConfigError(f"digits.image_size must be >= 2 and digits.hidden non-empty "
                              f"positive widths, got {self.image_size}, {self.hidden}")

    def tasks(self, protocol: str) -> int:
        return len(self.groups) if protocol == "split" else self.permutations


def load_images(cfg: DigitSequenceConfig) -> tuple[Tensor, Tensor, list[str]]:
    """Flat images in [0, 1] ([n, features]), their labels and the class names."""
    if cfg.image_dir is None:
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = torch.tensor(digits.data, dtype=torch.float32) / 16.0
        return images, torch.tensor(digits.target), [str(c) for c in digits.target_names]
    from instill.tasks.images import load_image_folder

    found = load_image_folder(cfg.image_dir, cfg.image_size)
    return found.images.flatten(1), found.labels, found.class_names


def held_out_split(labels: Tensor, select: float, test: float,
                   seed: int) -> dict[str, Tensor]:
    """Row indices of the train, select and test images, stratified by class."""
    gen, parts = torch.Generator().manual_seed(seed), {"train": [], "select": [], "test": []}
    for c in labels.unique():
        rows = (labels == c).nonzero().squeeze(1)
        rows = rows[torch.randperm(len(rows), generator=gen)]
        n_test, n_select = round(test * len(rows)), round(select * len(rows))
        if len(rows) - n_test - n_select < 1 or min(n_test, n_select) < 1:
            raise ConfigError(f"class {int(c)} has {len(rows)} images: too few to hold out "
                              "selection and test images; add images or change the fractions")
        parts["test"].append(rows[:n_test])
        parts["select"].append(rows[n_test:n_test + n_select])
        parts["train"].append(rows[n_test + n_select:])
    return {k: torch.cat(v).sort().values for k, v in parts.items()}


def permutations(features: int, tasks: int, seed: int) -> Tensor:
    """One fixed pixel permutation per task ([tasks, features]), drawn from `seed`."""
    gen = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(features, generator=gen) for _ in range(tasks)])


class DigitSequence:
    """Split or permuted digits with held-out test images and one head per task."""

    def __init__(self, cfg: DigitSequenceConfig, protocol: str, device: str = "cpu") -> None:
        if protocol not in PROTOCOLS:
            raise ConfigError(f"digits protocol must be one of {list(PROTOCOLS)}, got "
                              f"{protocol!r}")
        self.cfg, self.protocol, self.device = cfg, protocol, device
        images, labels, names = load_images(cfg)
        self.features = images.shape[1]
        self.index = held_out_split(labels, cfg.select_fraction, cfg.test_fraction,
                                    cfg.split_seed)
        if protocol == "split":
            unknown = sorted({c for g in cfg.groups for c in g} - set(range(len(names))))
            if unknown:
                raise ConfigError(f"digits.groups names classes {unknown}, but the images have "
                                  f"{len(names)} classes (0..{len(names) - 1})")
            self.names = ["+".join(names[c] for c in g) for g in cfg.groups]
            self.classes = torch.tensor(cfg.groups)  # the class behind each head output
        else:
            self.perms = permutations(self.features, cfg.permutations, cfg.split_seed)
            self.names = [f"perm{t}" for t in range(cfg.permutations)]
            self.classes = torch.arange(len(names)).repeat(cfg.permutations, 1)
        self.data = {split: [self._rows(images[rows], labels[rows], t)
                             for t in range(len(self.names))]
                     for split, rows in self.index.items()}

    def _rows(self, images: Tensor, labels: Tensor, task: int) -> Data:
        """Task `task`'s (images, label in its head, task) rows from the split's images."""
        if self.protocol == "split":
            group = self.classes[task]
            keep = (labels[:, None] == group).any(1)
            images, labels = images[keep], (labels[keep, None] == group).int().argmax(1)
        else:
            images = images[:, self.perms[task]]
        tasks = torch.full((len(labels),), task, dtype=torch.int64)
        return images.to(self.device), labels.long().to(self.device), tasks.to(self.device)

    @property
    def width(self) -> int:
        return self.classes.shape[1]

    def build(self) -> nn.Module:
        return build_model("mlp_heads", in_features=self.features, hidden=self.cfg.hidden,
                           head_sizes=[self.width] * len(self.names)).to(self.device)

    def heads(self, task: int) -> tuple[str, ...]:
        return (f"heads.{task}",)

    def untargeted(self) -> list[str]:
        return [f"heads.{t}" for t in range(len(self.names))]

    def train(self, task: int) -> Data:
        return self.data["train"][task]

    def pool(self, task: int) -> Data:
        return self.data["train"][task]

    def select(self, task: int) -> Data:
        return self.data["select"][task]

    def test(self, task: int) -> Data:
        return self.data["test"][task]

    def head_logits(self, model: nn.Module, images: Tensor) -> Tensor:
        """[n, tasks, width]: every task's head."""
        return model(images).float().view(len(images), len(self.names), self.width)

    def logits(self, model: nn.Module, images: Tensor, tasks: Tensor) -> Tensor:
        """Each row's own task's head."""
        return self.head_logits(model, images)[torch.arange(len(images)), tasks]

    def loss(self, model: nn.Module, batch: Sequence[Tensor]) -> Tensor:
        images, labels, tasks = batch
        return F.cross_entropy(self.logits(model, images, tasks), labels)

    @torch.no_grad()
    def accuracy(self, model: nn.Module, data: Data, batch_size: int = 2048) -> float:
        model.eval()
        hits = sum(int((self.logits(model, x, t).argmax(1) == y).sum())
                   for x, y, t in zip(*(d.split(batch_size) for d in data), strict=True))
        return hits / len(data[0])

    def outputs(self, model: nn.Module, data: Data) -> TaskOutputs:
        images, labels, _ = data
        return TaskOutputs(self.head_logits(model, images), labels)


__all__ = ["PROTOCOLS", "DigitSequence", "DigitSequenceConfig", "held_out_split",
           "load_images", "permutations"]
