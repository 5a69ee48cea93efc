"""The configs of `instill modules` (arithmetic, and `task: shapes` for vision): what a run is,
its presets, and how they layer."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from instill.core import MaskConfig
from instill.errors import ConfigError, ExpressionError
from instill.experiments.common import layered_config
from instill.experiments.pipeline import GatePolicy
from instill.models import check_activation
from instill.models.specs import ResNetSpec
from instill.tasks.arithmetic import ArithmeticSpec
from instill.tasks.expr import parse
from instill.tasks.shapes import ShapeWorld
from instill.training import DiscoveryConfig, FitConfig

#: The arithmetic config keys a reused base model must share with this run.
MODEL_KEYS = ("base", "numbers", "modulus", "n_embd", "n_head", "dropout", "activation")
UNION_CONDITIONS = ("union", "first", "second", "random")
#: The shapebias config keys a reused vision base model must share with this run.
SHAPES_MODEL_KEYS = ("classes", "size", "rho", "resnet")
SHAPES_SUBTASKS = {"shape": "shape_only", "texture": "texture_only"}  # subtask -> split
SHAPES_UNION_CONDITIONS = ("union", "shape", "texture", "random")


@dataclass
class ModulesGates(GatePolicy):
    """What the analyses rely on, checked for every pipeline."""

    base_accuracy: float = 0.99  # base-task accuracy on held-out pairs
    subnetwork_accuracy: float = 0.9  # each subtask's accuracy with only its subnetwork kept


@dataclass
class CompressionConfig:
    """The compression curve of the base model: kept fractions and trained-mask settings."""

    fractions: list[float] = field(default_factory=lambda: [0.5, 0.2, 0.1, 0.05, 0.02])
    lambdas: list[float] = field(default_factory=lambda: [1e-7, 1e-5, 1e-4])  # continuous
    hard_concrete_lambda: float | None = 1e-6  # null: no hard-concrete point
    top_k: list[float] = field(default_factory=lambda: [0.2, 0.05])  # top-k kept fractions
    samples: int = 10_000  # base-task sequences the trained masks see

    def __post_init__(self) -> None:
        for name in ("fractions", "top_k"):
            if any(not 0 < f <= 1 for f in getattr(self, name)):
                raise ConfigError(f"compression.{name} must be fractions in (0, 1], got "
                                  f"{getattr(self, name)}")
        if any(lam < 0 for lam in self.lambdas):
            raise ConfigError(f"compression.lambdas must be >= 0, got {self.lambdas}")


@dataclass
class UnionConfig:
    """Union induction: two subtasks' subnetworks together against each alone."""

    pair: list[str] = field(default_factory=lambda: ["a^2", "a*b"])
    targets: list[str] = field(default_factory=lambda: ["a^2 + a", "a*b + a"])  # one per pair
    grid: list[int] = field(default_factory=lambda: [0, 25, 100, 400, 1600])
    induction_fit: FitConfig = field(default_factory=lambda: FitConfig(
        epochs=100, batch_size=50, lr=2e-4, weight_decay=0.01))
    n_val: int = 1000
    n_test: int = 1000
    enabled: bool = True


@dataclass
class ModulesConfig:
    """Everything that defines a modules run; the defaults are paper-sized."""

    task: Literal["arithmetic"] = "arithmetic"
    from_run: str | None = None  # reuse this arithmetic run's base models
    base: str = "a^2 + a*b + b"
    subtasks: list[str] = field(default_factory=lambda: ["a^2", "a*b", "b"])
    modulus: int = 7
    numbers: int = 1000
    layers: int = 2
    n_embd: int = 128
    n_head: int = 4
    dropout: float = 0.1
    activation: str = "gelu_new"
    loss: Literal["lm", "answer"] = "lm"
    seed: int = 0
    replicates: int = 5
    gates: ModulesGates = field(default_factory=ModulesGates)
    base_samples: int = 200_000
    base_val: int = 2000
    base_fit: FitConfig = field(default_factory=lambda: FitConfig(
        epochs=50, batch_size=50, lr=5e-4, weight_decay=0.01, patience=5))
    subtask_samples: int = 50_000
    discovery: DiscoveryConfig = field(default_factory=lambda: DiscoveryConfig(
        epochs=50, batch_size=500, lr=1e-3, final_temperature=100.0,
        mask=MaskConfig(l0_lambda=1e-7, init=-0.1)))
    eval_samples: int = 2000  # pairs each analysis metric is measured on
    compression: CompressionConfig = field(default_factory=CompressionConfig)
    union: UnionConfig = field(default_factory=UnionConfig)

    def __post_init__(self) -> None:
        ArithmeticSpec(numbers=self.numbers, modulus=self.modulus)
        for name, text in [("base", self.base), *((f"subtasks[{i}]", s) for i, s in
                                                  enumerate(self.subtasks)),
                           *((f"union.targets[{i}]", t) for i, t in
                             enumerate(self.union.targets))]:
            try:
                parse(text)
            except ExpressionError as err:
                raise ConfigError(f"{name}: {err}") from None
        if len(self.subtasks) < 2 or len(set(self.subtasks)) != len(self.subtasks):
            raise ConfigError(f"subtasks must list at least two different expressions, got "
                              f"{self.subtasks}")
        if self.union.enabled and (len(self.union.pair) != 2 or len(self.union.targets) != 2
                                   or not set(self.union.pair) <= set(self.subtasks)
                                   or self.union.pair[0] == self.union.pair[1]):
            raise ConfigError(f"union.pair must name two different subtasks of {self.subtasks} "
                              f"and union.targets one target each; got {self.union.pair} and "
                              f"{self.union.targets} (or set union.enabled=false)")
        if self.layers < 1 or self.replicates < 1 or self.n_embd % self.n_head:
            raise ConfigError("layers and replicates must be >= 1 and n_embd divisible by "
                              f"n_head; got {self.layers}, {self.replicates}, {self.n_embd}, "
                              f"{self.n_head}")
        check_activation(self.activation)


@dataclass
class ShapesGates(GatePolicy):
    """What the vision analyses rely on, checked for every pipeline (the shapebias gates)."""

    natural_accuracy: float = 0.8  # the base model's held-out natural accuracy
    texture_bias: float = 0.5  # 1 - its shape bias on cue-conflict images
    subnetwork_accuracy: float = 0.6  # each subnetwork alone on its own split


@dataclass
class ShapesUnionConfig:
    """Union induction in vision: shape+texture subnetworks together against each alone and a
    random init, trained on natural images as the shapebias induction phase."""

    grid: list[int] = field(default_factory=lambda: [500, 2000, 8000])
    induction_fit: FitConfig = field(default_factory=lambda: FitConfig(
        epochs=20, batch_size=64, lr=1e-3, weight_decay=1e-4, optimizer="sgd", momentum=0.9))
    induction_min_examples: int = 0  # train on at least this many examples: small n, more epochs
    enabled: bool = True


@dataclass
class ShapesModulesConfig:
    """A vision modules run (`task: shapes`): shape and texture subnetworks of a ResNet trained
    on the generated shape world; the defaults are paper-sized (GPU)."""

    task: Literal["shapes"] = "shapes"
    from_run: str | None = None  # reuse this shapebias run's base models
    classes: int = 12
    size: int = 64
    rho: float = 0.95
    resnet: ResNetSpec = field(default_factory=ResNetSpec)
    seed: int = 0
    replicates: int = 5
    gates: ShapesGates = field(default_factory=ShapesGates)
    base_samples: int = 50_000
    base_val: int = 2000
    base_fit: FitConfig = field(default_factory=lambda: FitConfig(
        epochs=60, batch_size=128, lr=1e-3, weight_decay=0.05, patience=10))
    discovery_samples: int = 20_000  # images of each subtask's split (and natural, for base)
    discovery: DiscoveryConfig = field(default_factory=lambda: DiscoveryConfig(
        epochs=100, batch_size=32, lr=1e-3, final_temperature=100.0,
        mask=MaskConfig(l0_lambda=1e-8, init=0.1)))
    eval_samples: int = 2000  # held-out images per split each analysis metric is measured on
    n_val: int = 2000  # natural validation images (model selection)
    compression: CompressionConfig = field(default_factory=lambda: CompressionConfig(
        lambdas=[1e-8, 1e-6, 1e-5], hard_concrete_lambda=1e-7, samples=20_000))
    union: ShapesUnionConfig = field(default_factory=ShapesUnionConfig)

    def __post_init__(self) -> None:
        self.world  # noqa: B018  (validates classes, size and rho)
        for name in ("replicates", "base_samples", "base_val", "discovery_samples",
                     "eval_samples", "n_val"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.union.grid or min(self.union.grid) < 1:
            raise ConfigError(f"union.grid must be a non-empty list of counts >= 1, got "
                              f"{self.union.grid}")

    @property
    def world(self) -> ShapeWorld:
        return ShapeWorld(classes=self.classes, size=self.size, rho=self.rho)

    @property
    def subtasks(self) -> list[str]:
        return list(SHAPES_SUBTASKS)


PRESETS: dict[str, dict[str, Any]] = {
    "paper": {},
    "quick": {
        "numbers": 200, "n_embd": 64, "loss": "answer", "activation": "gelu_pytorch_tanh",
        "replicates": 5, "base_samples": 20_000, "base_val": 500,
        "base_fit": {"epochs": 80, "batch_size": 128, "lr": 1e-3, "patience": None,
                     "stop_at": 0.998, "stop_after": 2, "fused": True},
        "subtask_samples": 10_000,
        "discovery": {"epochs": 10, "batch_size": 250, "lr": 1e-2, "fused": True},
        "compression": {"lambdas": [1e-7, 1e-4], "top_k": [0.1], "samples": 10_000},
        "union": {"grid": [0, 50, 200, 800], "n_val": 300, "n_test": 500,
                  "induction_fit": {"epochs": 40, "batch_size": 64, "lr": 1e-3,
                                    "stop_at": 0.998, "stop_after": 2, "fused": True}},
    },
}


SHAPES_PRESETS: dict[str, dict[str, Any]] = {
    "paper": {},
    "quick": {
        "classes": 8, "size": 32, "rho": 0.95,
        "resnet": {"embedding_size": 16, "hidden_sizes": [16, 32, 64], "depths": [1, 1, 1]},
        "replicates": 6, "base_samples": 4000, "base_val": 500,
        "base_fit": {"epochs": 30, "batch_size": 64, "lr": 2e-3, "weight_decay": 0.01,
                     "patience": 6, "fused": True},
        "discovery_samples": 4000,
        "discovery": {"epochs": 15, "batch_size": 64, "lr": 1e-2, "mask": {"l0_lambda": 1e-5},
                      "fused": True},
        "eval_samples": 1000, "n_val": 500,
        "compression": {"lambdas": [1e-5, 1e-4], "hard_concrete_lambda": 1e-5,
                        "top_k": [0.1], "samples": 2000},
        "union": {"grid": [250, 1000], "induction_min_examples": 12_000,
                  "induction_fit": {"epochs": 10, "batch_size": 32, "lr": 2e-3,
                                    "weight_decay": 0.01, "optimizer": "adamw",
                                    "fused": True}},
    },
}


def load_config(preset: str | None = "paper", file_values: dict | None = None,
                overrides: dict | None = None) -> ModulesConfig | ShapesModulesConfig:
    """Defaults, then the preset, then a config file's values, then command-line overrides;
    `task: shapes` (in the file or the overrides) gives the vision config."""
    task = (overrides or {}).get("task") or (file_values or {}).get("task") or "arithmetic"
    if task not in ("arithmetic", "shapes"):
        raise ConfigError(f"task must be 'arithmetic' or 'shapes', got {task!r}")
    if task == "shapes":
        return layered_config(ShapesModulesConfig, SHAPES_PRESETS, preset, file_values,
                              overrides, "modules config (task: shapes)")
    return layered_config(ModulesConfig, PRESETS, preset, file_values, overrides,
                          "modules config")


__all__ = ["MODEL_KEYS", "PRESETS", "SHAPES_MODEL_KEYS", "SHAPES_PRESETS", "SHAPES_SUBTASKS",
           "SHAPES_UNION_CONDITIONS", "UNION_CONDITIONS", "CompressionConfig", "ModulesConfig",
           "ModulesGates", "ShapesGates", "ShapesModulesConfig", "ShapesUnionConfig",
           "UnionConfig", "load_config"]
