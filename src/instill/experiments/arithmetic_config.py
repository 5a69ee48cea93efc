"""What defines an arithmetic run: its config (tasks, model, phases, gates) and presets."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Literal

from instill.core import MaskConfig
from instill.errors import ConfigError, ExpressionError
from instill.experiments.common import (
    CONDITIONS,
    check_conditions,
    layered_config,
)
from instill.experiments.pipeline import GatePolicy
from instill.models import check_activation, check_heads
from instill.tasks.arithmetic import ArithmeticSpec
from instill.tasks.expr import parse
from instill.training import DiscoveryConfig, FitConfig

#: Subtask Induction, the paper's controls, and the controls on where the transfer comes from
#: (the subnetwork or the trained embeddings, norms and biases around it).
ARITHMETIC_CONDITIONS = ("subnet", "sampled", "complement", "full", "random", "embeddings_only",
                         "subnet-fresh", "sampled-fresh", "complement-fresh")

PAPER_GRID = [0, 10, 16, 25, 40, 64, 100, 160, 250, 400, 640, 1000, 1600, 2500, 4000, 6400,
              10000]


@dataclass
class ArithmeticGates(GatePolicy):
    """What the induction sweep relies on, checked for every pipeline before it runs."""

    base_accuracy: float = 0.99  # base-task accuracy on held-out pairs
    subnetwork_accuracy: float = 0.9  # subtask accuracy with only the subnetwork kept
    # Base-task accuracy with a random same-size ablation minus with the subnetwork ablated:
    # removing the subnetwork must hurt far more than removing as many random weights. (The
    # base task, since the trained model computes the subtask only inside it: its accuracy on
    # the subtask alone is near chance before and after any ablation.)
    ablation_margin: float = 0.5
    # The same margin for a subnetwork discovered at a target density, as (density, margin)
    # points, interpolated linearly in density (and towards 0 below the first point): a
    # sparse subnetwork cannot cost the base task what a dense one does, so its threshold is
    # set from the margins measured at each density (docs/arithmetic.md, "Gates by density").
    # Half the smallest margin measured at each density over 6 calibration pipelines of the
    # quick preset's model (seed 1000, none of a preset's seeds): 0.29, 0.52, 0.65.
    ablation_margin_by_density: list[list[float]] = field(
        default_factory=lambda: [[0.05, 0.15], [0.1, 0.25], [0.2, 0.3]])

    def ablation_threshold(self, target: float | None) -> float:
        """The ablation-specificity threshold of a subnetwork at `target` (None: wherever
        discovery landed, `ablation_margin`)."""
        if target is None:
            return self.ablation_margin
        points = sorted((float(d), float(m)) for d, m in self.ablation_margin_by_density)
        below = [(0.0, min(0.0, points[0][1])), *points]
        for (d0, m0), (d1, m1) in itertools.pairwise(below):
            if target <= d1:
                return m0 + (m1 - m0) * (target - d0) / (d1 - d0)
        return points[-1][1]

    def __post_init__(self) -> None:
        super().__post_init__()
        points = self.ablation_margin_by_density
        if not points or any(len(p) != 2 or not 0 < p[0] <= 1 for p in points):
            raise ConfigError("gates.ablation_margin_by_density must be a non-empty list of "
                              f"[density, margin] pairs with density in (0, 1], got {points}")


@dataclass
class ArithmeticConfig:
    """Everything that defines an arithmetic run; the defaults are the paper's settings."""

    base: str = "a + a*b"
    subtask: str = "a*b"
    target: str = "a^2 + a*b"
    alternatives: list[str] = field(default_factory=lambda: ["2*a^2", "2*b^2"])
    modulus: int = 7
    numbers: int = 1000
    layers: list[int] = field(default_factory=lambda: [2, 4, 6, 8, 10, 12])
    n_embd: int = 128
    n_head: int = 4
    dropout: float = 0.1
    activation: str = "gelu_new"  # HF GPT-2's; "gelu_pytorch_tanh": same function, one kernel
    loss: Literal["lm", "answer"] = "lm"
    seed: int = 0
    replicates: int = 3  # independent pipelines (base model, subnetwork, cells) per depth
    seeds: int = 1  # downstream seeds per replicate and grid point
    gates: ArithmeticGates = field(default_factory=ArithmeticGates)
    base_samples: int = 200_000
    base_val: int = 2000
    base_fit: FitConfig = field(default_factory=lambda: FitConfig(
        epochs=50, batch_size=50, lr=5e-4, weight_decay=0.01, patience=5))
    subtask_samples: int = 50_000
    # As the reference ran it: AdamW's default weight decay (0.01) on the mask logits, and the
    # epoch whose subnetwork computes the subtask best on held-out pairs is kept.
    discovery: DiscoveryConfig = field(default_factory=lambda: DiscoveryConfig(
        epochs=50, batch_size=500, lr=1e-3, final_temperature=100.0, keep_best=True,
        mask=MaskConfig(l0_lambda=1e-7, init=-0.1, weight_decay=0.01)))
    # Subnetwork densities: null is wherever discovery lands (the paper's); a number is a
    # target kept fraction (`discovery.target_density`). Conditions that use the subnetwork
    # run once per density, against the same base model.
    densities: list[float | None] = field(default_factory=lambda: [None])
    # The L0 penalty of discoveries at a target density (null: discovery.mask.l0_lambda). The
    # budget sets the size; the penalty pushes the weights the subtask does not need away
    # from the threshold, without which 2% subnetworks computed the subtask at 0.41-0.67
    # (docs/arithmetic.md, "Subnetworks at chosen densities").
    density_l0_lambda: float | None = 1e-4
    grid: list[int] = field(default_factory=lambda: list(PAPER_GRID))
    conditions: list[str] = field(default_factory=lambda: list(ARITHMETIC_CONDITIONS))
    induction_fit: FitConfig = field(default_factory=lambda: FitConfig(
        epochs=100, batch_size=50, lr=2e-4, weight_decay=0.01))
    # Induction models trained together in one vmapped stack (cells of one depth and n, up to
    # this many; `instill.batched`); 1 trains them one at a time. See docs/performance.md for
    # where stacking pays.
    induction_batch: int = 1
    # The first attempt's base models of one depth, then their discoveries, trained as
    # vmapped stacks of up to this many (in the driver process, before the pipelines run;
    # pays on a GPU); 1 leaves each to its pipeline.
    pipeline_batch: int = 1
    n_val: int = 1000
    n_test: int = 1000
    freeze: bool = True
    threshold: float = 0.95
    tf32: bool = False  # TF32 matmuls on a CUDA device (faster; results differ like a seed's)

    def __post_init__(self) -> None:
        self.spec  # noqa: B018  (validates numbers and modulus)
        named = [("base", self.base), ("subtask", self.subtask), ("target", self.target),
                 *((f"alternatives[{i}]", alt) for i, alt in enumerate(self.alternatives))]
        for name, text in named:
            try:
                parse(text)
            except ExpressionError as err:
                raise ConfigError(f"{name}: {err}") from None
        if not self.layers or min(self.layers) < 1:
            raise ConfigError(f"layers must be a non-empty list of depths >= 1, got {self.layers}")
        check_activation(self.activation)
        check_heads(self.n_embd, self.n_head)
        if self.seeds < 1 or self.replicates < 1:
            raise ConfigError(f"seeds and replicates must be >= 1, got {self.seeds} and "
                              f"{self.replicates}")
        if not self.grid or min(self.grid) < 0:
            raise ConfigError(f"grid must be a non-empty list of counts >= 0, got {self.grid}")
        check_conditions(self.conditions, list(CONDITIONS))
        if not self.densities or len(set(self.densities)) != len(self.densities) or any(
                d is not None and not 0 < d < 1 for d in self.densities):
            raise ConfigError(f"densities must be a non-empty list of distinct targets in (0, 1) "
                              f"or null (where discovery lands), got {self.densities}")
        if self.induction_batch < 1 or self.pipeline_batch < 1:
            raise ConfigError(f"induction_batch and pipeline_batch must be >= 1, got "
                              f"{self.induction_batch} and {self.pipeline_batch}")
        if not 0 < self.threshold <= 1:
            raise ConfigError(f"threshold must be in (0, 1], got {self.threshold}")

    @property
    def spec(self) -> ArithmeticSpec:
        return ArithmeticSpec(numbers=self.numbers, modulus=self.modulus)


_QUICK: dict[str, Any] = {
    "numbers": 200,
    "layers": [2],
    "n_embd": 64,
    "loss": "answer",
    "activation": "gelu_pytorch_tanh",
    "replicates": 9,
    "seeds": 1,
    # Two densities chosen before running: where discovery lands (about 0.37) and a sparse
    # target, 0.05 (at 0.02 the quick discovery schedule leaves half the subnetworks short of
    # computing the subtask alone); against each, the same-size random control and the
    # reference's inverse one; the `-fresh` and complement controls are in `--preset decide`.
    "densities": [None, 0.05],
    "conditions": ["subnet", "sampled", "sampled-inverse", "full", "random",
                   "embeddings_only"],
    "base_samples": 20_000,
    "base_val": 500,
    # No patience: the base model sits on a plateau for 5-60 epochs before it learns the
    # residues (docs/arithmetic.md); it stops once validation holds 0.998 twice, and 80
    # epochs is the budget for the slowest seeds (1 in 20 needed 59). lr 1e-3 leaves the
    # plateau soonest (5e-4, 2e-3 and 4e-3 were slower on the same seeds).
    "base_fit": {"epochs": 80, "batch_size": 128, "lr": 1e-3, "patience": None,
                 "stop_at": 0.998, "stop_after": 2, "fused": True},
    "subtask_samples": 10_000,
    "discovery": {"epochs": 10, "batch_size": 250, "lr": 1e-2, "fused": True,
                  "keep_best": False, "mask": {"weight_decay": 0.0}},
    "grid": [0, 25, 100, 250, 640, 1600],
    # 40 epochs and 250 validation pairs pay for the nine pipelines (60 and 500 did six in
    # the same time); the small-n cells train to the budget either way (docs/arithmetic.md).
    # A grid point's cells train as one vmapped stack, with counter-based dropout so each
    # model trains as it would alone (docs/performance.md: stacks pay on 2 CPU cores too).
    "induction_fit": {"epochs": 40, "batch_size": 64, "lr": 1e-3, "stop_at": 0.998,
                      "stop_after": 2, "fused": True, "dropout_rng": "counter"},
    "induction_batch": 256,
    "n_val": 250,
    "n_test": 1000,
}

PRESETS: dict[str, dict[str, Any]] = {
    "paper": {},
    "quick": _QUICK,
    # The question of issue 19 at the quick preset's size: the specificity curve over four
    # densities chosen before running, against the same-size and the reference's inverse
    # controls (and the complement ones), 9 pipelines; about 4x the quick preset's cells.
    "decide": {**_QUICK, "densities": [0.05, 0.1, 0.2, None],
               "conditions": ["subnet", "sampled", "sampled-inverse", "complement",
                              "complement-inverse", "full", "random", "embeddings_only"]},
}


def load_config(preset: str | None = "paper", file_values: dict | None = None,
                overrides: dict | None = None) -> ArithmeticConfig:
    """Defaults, then the preset, then a config file's values, then command-line overrides."""
    return layered_config(ArithmeticConfig, PRESETS, preset, file_values, overrides,
                          "arithmetic config")


__all__ = ["ARITHMETIC_CONDITIONS", "PAPER_GRID", "PRESETS", "ArithmeticConfig",
           "ArithmeticGates", "load_config"]
