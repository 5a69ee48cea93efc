"""Config, presets and method names of `instill continual`, and the task sequence it runs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from instill.core import MaskConfig
from instill.core.isolation import CapacityError
from instill.errors import ConfigError, ExpressionError
from instill.experiments.common import layered_config, merge
from instill.experiments.pipeline import GatePolicy
from instill.models import check_activation, check_heads
from instill.tasks.digit_sequences import DigitSequence, DigitSequenceConfig
from instill.tasks.expr import parse
from instill.tasks.shape_sequences import ShapeSequence, ShapeSequenceConfig
from instill.tasks.task_sequences import ArithmeticSequence, TaskSequence, TaskTokenSpec
from instill.training import DiscoveryConfig, FitConfig

DEFAULT_METHODS = ("subnetwork", "subnetwork-reinit", "packnet", "packnet-reinit", "finetune",
                   "replay", "joint", "independent")
METHODS = (*DEFAULT_METHODS, "supsup")
ISOLATION = ("subnetwork", "packnet")
TASKS = ("arithmetic", "shapes", "digits-split", "digits-permuted")


@dataclass(frozen=True)
class Method:
    """A parsed method name: `packnet-reinit@0.1` is base packnet, reinit, kept fraction 0.1."""

    base: str
    reinit: bool
    keep: float | None  # PackNet's kept fraction; None: the config's packnet_keep


def parse_method(name: str) -> Method:
    """Parse `base[-reinit][@fraction]`; the fraction is only for packnet."""
    head, _, fraction = name.partition("@")
    if head not in METHODS or (fraction and not head.startswith("packnet")):
        raise ConfigError(f"unknown method {name!r}; choose from {list(METHODS)}, with "
                          "'@FRACTION' only after packnet (e.g. packnet@0.1)")
    keep = None
    if fraction:
        try:
            keep = float(fraction)
        except ValueError:
            raise ConfigError(f"method {name!r}: {fraction!r} is not a number") from None
        if not 0 < keep < 1:
            raise ConfigError(f"method {name!r}: the kept fraction must be in (0, 1)")
    base, _, suffix = head.partition("-")
    return Method(base, suffix == "reinit", keep)


@dataclass
class SupSupConfig:
    """SupSup: the kept fraction of every supermask, the training of its scores, and how many
    test images of one task each one-shot task inference sees."""

    keep: float = 0.5  # edge-popup's best fraction of a random network (Ramanujan et al. 2020)
    infer_batch: int = 16  # images per inference (SupSup infers the task of a batch)
    fit: FitConfig = field(default_factory=lambda: FitConfig(
        epochs=40, batch_size=64, lr=3e-3, weight_decay=0.0, patience=8, fused=True))

    def __post_init__(self) -> None:
        if not 0 < self.keep < 1 or self.infer_batch < 1:
            raise ConfigError(f"supsup.keep must be in (0, 1) and supsup.infer_batch >= 1, got "
                              f"{self.keep}, {self.infer_batch}")


@dataclass
class ContinualGates(GatePolicy):
    """Each task must be learnt by its own training before the sequence goes on."""

    task_accuracy: float = 0.9  # accuracy of the trained model on task t right after training


@dataclass
class ContinualConfig:
    """Everything that defines a continual run; the defaults are the `paper` preset."""

    task: str = "arithmetic"
    sequence: list[str] = field(default_factory=lambda: ["a + b", "a*b", "a^2 + b", "a - b"])
    numbers: int = 11
    modulus: int = 11
    repeat: int = 16  # copies of the numbers^2 pairs in one training epoch
    shapes: ShapeSequenceConfig = field(default_factory=ShapeSequenceConfig)  # task=shapes
    digits: DigitSequenceConfig = field(default_factory=DigitSequenceConfig)  # task=digits-*
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))
    packnet_keep: float = 0.25  # PackNet: fraction of the free weights each task keeps
    replay: int = 64  # replay: examples of earlier tasks in the buffer (split evenly)
    min_free: float = 0.01  # stop with CapacityError when less is free before a task
    n_layer: int = 2
    n_embd: int = 64
    n_head: int = 4
    dropout: float = 0.0
    activation: str = "gelu_pytorch_tanh"
    seed: int = 0
    replicates: int = 8
    gates: ContinualGates = field(default_factory=ContinualGates)
    fit: FitConfig = field(default_factory=lambda: FitConfig(
        epochs=60, batch_size=64, lr=3e-3, weight_decay=0.01, stop_at=1.0, fused=True))
    retrain: FitConfig = field(default_factory=lambda: FitConfig(
        epochs=10, batch_size=64, lr=1e-3, weight_decay=0.0, stop_at=1.0, fused=True))
    discovery: DiscoveryConfig = field(default_factory=lambda: DiscoveryConfig(
        epochs=15, batch_size=128, lr=1e-2, final_temperature=100.0, fused=True,
        mask=MaskConfig(l0_lambda=1e-5, init=-0.1)))
    supsup: SupSupConfig = field(default_factory=SupSupConfig)

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ConfigError(f"task must be one of {list(TASKS)}, got {self.task!r}")
        if self.task == "arithmetic":
            self._check_arithmetic()
        parsed = [parse_method(m) for m in self.methods]
        if not self.methods or len(set(self.methods)) != len(self.methods):
            raise ConfigError(f"methods must be distinct names, got {self.methods}")
        if not 0 < self.packnet_keep < 1:
            raise ConfigError(f"packnet_keep must be in (0, 1), got {self.packnet_keep}")
        if not 0 <= self.min_free < 1:
            raise ConfigError(f"min_free must be in [0, 1), got {self.min_free}")
        if self.replay < 1:
            raise ConfigError(f"replay (the buffer size) must be >= 1, got {self.replay}")
        for m in parsed:
            if m.base == "packnet":
                self._check_packnet(m.keep or self.packnet_keep)
        mask = self.discovery.mask
        if mask.method != "continuous_sparsification" or mask.granularity != "weight":
            raise ConfigError("discovery.mask must use method continuous_sparsification at "
                              "granularity weight (earlier tasks' weights are held on per weight)")
        if self.replicates < 1 or self.repeat < 1:
            raise ConfigError(f"replicates and repeat must be >= 1, got {self.replicates}, "
                              f"{self.repeat}")

    def _check_arithmetic(self) -> None:
        if len(self.sequence) < 2:
            raise ConfigError(f"sequence needs at least two tasks, got {self.sequence}")
        for i, text in enumerate(self.sequence):
            try:
                parse(text)
            except ExpressionError as err:
                raise ConfigError(f"sequence[{i}]: {err}") from None
        TaskTokenSpec(self.numbers, self.modulus, len(self.sequence))
        check_activation(self.activation)
        check_heads(self.n_embd, self.n_head)

    def _check_packnet(self, keep: float) -> None:
        left = (1 - keep) ** (self.n_tasks - 1)
        if left < self.min_free:
            raise CapacityError(
                f"packnet keeps {keep:.0%} of the free weights per task, so only {left:.2%} are "
                f"free before task {self.n_tasks - 1} (min_free {self.min_free:.0%}); lower "
                "packnet_keep, use fewer tasks or lower min_free")

    @property
    def n_tasks(self) -> int:
        if self.task.startswith("digits-"):
            return self.digits.tasks(self.task.removeprefix("digits-"))
        return len(self.sequence) if self.task == "arithmetic" else len(self.shapes.groups)

    def task_sequence(self, device: str = "cpu") -> TaskSequence:
        """The sequence this config runs, with its data on `device`."""
        if self.task == "shapes":
            return ShapeSequence(self.shapes, self.seed, device)
        if self.task.startswith("digits-"):
            return DigitSequence(self.digits, self.task.removeprefix("digits-"), device)
        model = {"n_embd": self.n_embd, "n_layer": self.n_layer, "n_head": self.n_head,
                 "dropout": self.dropout, "activation": self.activation}
        return ArithmeticSequence(self.sequence, self.numbers, self.modulus, self.repeat, model,
                                  device)


QUICK_METHODS = ["subnetwork", "subnetwork-reinit", "packnet", "finetune", "replay", "joint",
                 "independent"]
PRESETS: dict[str, dict[str, Any]] = {
    "paper": {},
    "quick": {"replicates": 5, "methods": QUICK_METHODS, "fit": {"epochs": 40}},
}
#: Layered over PRESETS when task=shapes: a ResNet on images needs another schedule.
SHAPE_PRESETS: dict[str, dict[str, Any]] = {
    "paper": {"fit": {"epochs": 30, "lr": 3e-3, "batch_size": 64, "stop_at": None,
                      "patience": 8},
              "retrain": {"epochs": 8, "lr": 1e-3, "batch_size": 64, "stop_at": None},
              "discovery": {"epochs": 10, "batch_size": 64, "lr": 1e-2,
                            "mask": {"l0_lambda": 1e-5}},
              "gates": {"task_accuracy": 0.8}, "replay": 32},
    "quick": {"fit": {"epochs": 20, "patience": 5}, "retrain": {"epochs": 5},
              "discovery": {"epochs": 8},
              "methods": [*QUICK_METHODS, "packnet@0.05", "packnet@0.1"]},
}


#: Layered over PRESETS for both digits sequences: an MLP on 8x8 images, SupSup among the
#: methods, held-out selection images choosing the epoch (no stop at 1.0).
DIGIT_PRESETS: dict[str, dict[str, Any]] = {
    "paper": {"fit": {"epochs": 40, "lr": 3e-3, "batch_size": 64, "stop_at": None,
                      "patience": 8},
              "retrain": {"epochs": 8, "lr": 1e-3, "batch_size": 64, "stop_at": None},
              "discovery": {"epochs": 10, "batch_size": 64, "lr": 1e-2,
                            "mask": {"l0_lambda": 1e-5}},
              "gates": {"task_accuracy": 0.8}, "replay": 100,
              "methods": [*DEFAULT_METHODS, "supsup"]},
    "quick": {"fit": {"epochs": 30, "patience": 5}, "retrain": {"epochs": 5},
              "methods": ["subnetwork", "packnet", "packnet@0.1", "finetune", "replay", "joint",
                          "independent", "supsup"]},
}
TASK_PRESETS = {"shapes": SHAPE_PRESETS, "digits-split": DIGIT_PRESETS,
                "digits-permuted": DIGIT_PRESETS}


def load_config(preset: str | None = "paper", file_values: dict | None = None,
                overrides: dict | None = None) -> ContinualConfig:
    """Defaults, then the preset (with its task's layer, e.g. SHAPE_PRESETS), then a config
    file's values, then command-line overrides."""
    task = (overrides or {}).get("task") or (file_values or {}).get("task") or "arithmetic"
    presets = PRESETS
    if task in TASK_PRESETS:
        layer = TASK_PRESETS[task]
        presets = {name: merge(merge(PRESETS[name], layer["paper"]), layer.get(name, {}))
                   for name in PRESETS}
    return layered_config(ContinualConfig, presets, preset, file_values, overrides,
                          "continual config")


__all__ = ["DEFAULT_METHODS", "DIGIT_PRESETS", "ISOLATION", "METHODS", "PRESETS",
           "SHAPE_PRESETS", "TASKS", "ContinualConfig", "ContinualGates", "Method", "SupSupConfig",
           "load_config", "parse_method"]
