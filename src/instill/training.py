"""Plain training loops shared by the experiments: fit a model, discover a subnetwork.

Data are tuples of tensors held in memory (the experiments' data are small); batches are index
permutations drawn from a seeded generator, so a run is reproducible on the CPU.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from instill.core import MaskConfig, Subnetwork, attach_masks
from instill.errors import ConfigError, TrainingError
from instill.models.dropout import counter_dropout, set_step

LossFn = Callable[[nn.Module, Sequence[Tensor]], Tensor]
EvalFn = Callable[[nn.Module], float]


@dataclass
class FitConfig:
    """Optimizer and schedule of one training run."""

    epochs: int = 10
    batch_size: int = 50
    lr: float = 1e-3
    weight_decay: float = 0.01
    optimizer: str = "adamw"
    momentum: float = 0.9
    patience: int | None = None  # stop after this many validations without a better score
    stop_at: float | None = None  # stop once the validation score reaches this (task learnt)
    stop_after: int = 1  # ... on this many validations in a row (not on a lucky one)
    eval_every: int = 1  # validate every k-th epoch and the last; 1 is the paper's schedule
    fused: bool = False  # AdamW's fused kernel (torch >= 2.4): the same update in fewer ops,
    # faster for small models, but rounded differently, so results differ in the last bits
    # Where dropout masks come from: torch's generator ("torch"), or a hash of the seed, step
    # and element ("counter"), the same whether a model trains alone or in a batched stack
    # (`instill.batched`) and on any device; the two differ like two seeds.
    dropout_rng: Literal["torch", "counter"] = "torch"

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise ConfigError(f"epochs and batch_size must be >= 1, got {self.epochs}, "
                              f"{self.batch_size}")
        if not self.lr > 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if self.optimizer not in ("adamw", "sgd"):
            raise ConfigError(f"optimizer must be 'adamw' or 'sgd', got {self.optimizer!r}")
        if self.patience is not None and self.patience < 1:
            raise ConfigError(f"patience must be >= 1 or null, got {self.patience}")
        if self.eval_every < 1:
            raise ConfigError(f"eval_every must be >= 1, got {self.eval_every}")
        if self.stop_at is not None and not 0 < self.stop_at <= 1:
            raise ConfigError(f"stop_at must be in (0, 1] or null, got {self.stop_at}")
        if self.stop_after < 1:
            raise ConfigError(f"stop_after must be >= 1, got {self.stop_after}")
        if self.dropout_rng not in ("torch", "counter"):
            raise ConfigError(f"dropout_rng must be 'torch' or 'counter', got "
                              f"{self.dropout_rng!r}")


@dataclass
class FitResult:
    """What a run achieved: the best validation score, its epoch, and the per-epoch history."""

    best_score: float = -math.inf
    best_epoch: int = -1
    history: list[dict[str, float]] = field(default_factory=list)


FUSED_ADAMW = tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 4)


def make_optimizer(params, cfg: FitConfig) -> torch.optim.Optimizer:
    """AdamW (fused where torch has the kernel and `cfg.fused`) or SGD with momentum."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,
                               weight_decay=cfg.weight_decay)
    fused = {"fused": True} if cfg.fused and FUSED_ADAMW else {}
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, **fused)


def batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[Tensor]:
    """Shuffled index batches covering `n` examples once."""
    order = torch.randperm(n, generator=generator)
    yield from order.split(batch_size)


def run_epoch(model: nn.Module, data: Sequence[Tensor], loss_fn: LossFn,
              optimizer: torch.optim.Optimizer, batch_size: int, generator: torch.Generator,
              epoch: int, after_step: Callable[[], None] | None = None,
              before_step: Callable[[int], None] | None = None) -> float:
    """One pass over `data` in training mode; returns the mean loss. Stops on a NaN loss.
    `before_step(i)` runs before the forward pass of step i of the epoch."""
    model.train()
    total, n = 0.0, len(data[0])
    for step, idx in enumerate(batches(n, batch_size, generator)):
        if before_step is not None:
            before_step(step)
        loss = loss_fn(model, [t[idx] for t in data])
        if not torch.isfinite(loss):
            raise TrainingError(
                f"the loss became {loss.item()} at epoch {epoch}, step {step}; lower the "
                "learning rate or check the data. The best state so far is kept."
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if after_step is not None:
            after_step()
        total += loss.item() * len(idx)
    model.eval()
    return total / n


def fit(model: nn.Module, data: Sequence[Tensor], loss_fn: LossFn, cfg: FitConfig, *,
        evaluate: EvalFn | None = None, params=None, seed: int = 0,
        desc: str = "train") -> FitResult:
    """Train `model` on `data`, selecting the epoch with the best `evaluate` score.

    The model ends in eval mode holding its best state (the last one without `evaluate`).
    A NaN or infinite loss raises TrainingError after restoring the best state.
    """
    params = list(model.parameters()) if params is None else params
    optimizer = make_optimizer(params, cfg)
    generator = torch.Generator().manual_seed(seed)
    result = FitResult()
    bar = tqdm(range(cfg.epochs), desc=desc, leave=False, disable=None)
    steps = math.ceil(len(data[0]) / cfg.batch_size)
    counter = cfg.dropout_rng == "counter"
    with counter_dropout(model) if counter else nullcontext():
        _fit_epochs(model, data, loss_fn, cfg, evaluate, optimizer, generator, result, bar, desc,
                    (lambda epoch: lambda i: set_step(model, seed, epoch * steps + i))
                    if counter else None)
    if evaluate is None:
        result.best_epoch = len(result.history) - 1
    return result


def _fit_epochs(model: nn.Module, data: Sequence[Tensor], loss_fn: LossFn, cfg: FitConfig,
                evaluate: EvalFn | None, optimizer: torch.optim.Optimizer,
                generator: torch.Generator, result: FitResult, bar, desc: str,
                keyed: Callable[[int], Callable[[int], None]] | None) -> None:
    """`fit`'s epochs: train, validate, keep the best state, stop early; the model ends in
    eval mode with its best state. `keyed(epoch)` keys counter dropout per step."""
    best_state, stale, settled = None, 0, 0
    try:
        for epoch in bar:
            try:
                loss = run_epoch(model, data, loss_fn, optimizer, cfg.batch_size, generator,
                                 epoch, before_step=keyed(epoch) if keyed else None)
            except TrainingError as err:
                raise TrainingError(f"{desc}: {err}") from None
            row = {"epoch": epoch, "loss": loss}
            last = epoch == cfg.epochs - 1
            if evaluate is not None and (epoch % cfg.eval_every == cfg.eval_every - 1 or last):
                row["val"] = score = evaluate(model)
                reached = cfg.stop_at is not None and score >= cfg.stop_at
                settled = settled + 1 if reached else 0
                if score > result.best_score:
                    result.best_score, result.best_epoch, stale = score, epoch, 0
                    best_state = copy.deepcopy(model.state_dict())
                else:
                    stale += 1
            result.history.append(row)
            bar.set_postfix({k: round(v, 4) for k, v in row.items() if k != "epoch"})
            if cfg.patience is not None and stale >= cfg.patience:
                break
            if settled >= cfg.stop_after:
                break
    finally:
        if best_state is not None:
            model.load_state_dict(best_state)
        model.eval()


@dataclass
class DiscoveryConfig:
    """Continuous-sparsification schedule for finding a subnetwork (method.md, step 1)."""

    epochs: int = 50
    batch_size: int = 500
    lr: float = 1e-3
    final_temperature: float = 100.0
    mask: MaskConfig = field(default_factory=MaskConfig)
    fused: bool = False  # fused AdamW kernel for the mask logits (see FitConfig.fused)
    # Keep this fraction of the targeted weights: after every step the logits move by one
    # constant so that the fraction is exactly what is kept (continuous sparsification's hard
    # mask is logits > 0), so discovery learns a subnetwork of that size. None: wherever the
    # L0 penalty and the schedule land.
    target_density: float | None = None
    # Return the epoch whose hard mask scores best on the evaluation data (the reference
    # implementation does), not the last one; needs `evaluate`.
    keep_best: bool = False
    # The kept fraction falls from 0.5 to target_density over this fraction of the steps
    # (cubic, as in gradual magnitude pruning), then stays there.
    target_warmup: float = 0.5

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise ConfigError("discovery epochs and batch_size must be >= 1")
        if not self.final_temperature >= 1:
            raise ConfigError(f"final_temperature must be >= 1, got {self.final_temperature}")
        if self.target_density is not None:
            if not 0 < self.target_density < 1:
                raise ConfigError(f"target_density must be in (0, 1) or null, got "
                                  f"{self.target_density}")
            if (self.mask.method, self.mask.granularity) != ("continuous_sparsification",
                                                             "weight"):
                raise ConfigError("target_density needs mask method continuous_sparsification "
                                  "at weight granularity (top_k keeps a fraction itself: set "
                                  "mask.keep)")


def kept_fraction(target: float, progress: float, warmup: float) -> float:
    """The kept fraction at `progress` (0 to 1) of discovery: from 0.5 down to `target` along
    a cubic over the first `warmup` of it (Zhu and Gupta 2017's gradual pruning schedule)."""
    start = max(target, 0.5)
    left = 1 - min(1.0, progress / warmup) if warmup > 0 else 0.0
    return target + (start - target) * left ** 3


def discover(model: nn.Module, data: Sequence[Tensor], loss_fn: LossFn, cfg: DiscoveryConfig,
             *, evaluate: EvalFn | None = None, seed: int = 0,
             desc: str = "discover") -> tuple[Subnetwork, list[dict]]:
    """Train masks on `data` (the subtask) over a frozen `model`; return the hard subnetwork.

    The temperature starts at 1 and is multiplied each epoch by `final_temperature ** (1 /
    epochs)`, reaching `final_temperature` at the end. `evaluate` scores the hard mask after
    every epoch (recorded; with `keep_best` the best epoch is returned). The model is returned
    untouched.
    """
    if cfg.keep_best and evaluate is None:
        raise ConfigError("discovery.keep_best needs evaluation data to pick the best epoch")
    masked = attach_masks(model, cfg.mask)
    growth = cfg.final_temperature ** (1 / cfg.epochs)
    fit_cfg = FitConfig(epochs=1, batch_size=cfg.batch_size, lr=cfg.lr,
                        weight_decay=cfg.mask.weight_decay, fused=cfg.fused)
    optimizer = make_optimizer(masked.mask_parameters(), fit_cfg)
    generator = torch.Generator().manual_seed(seed)
    history: list[dict] = []
    best: tuple[float, int, dict[str, Tensor]] | None = None

    def penalized(model: nn.Module, batch: Sequence[Tensor]) -> Tensor:
        return loss_fn(model, batch) + masked.l0_penalty()

    steps = cfg.epochs * math.ceil(len(data[0]) / cfg.batch_size)
    done = 0

    def after_step() -> None:
        nonlocal done
        done += 1
        if cfg.target_density is not None:
            masked.keep_fraction(kept_fraction(cfg.target_density, done / steps,
                                               cfg.target_warmup))

    try:
        for epoch in tqdm(range(cfg.epochs), desc=desc, leave=False, disable=None):
            try:
                loss = run_epoch(masked, data, penalized, optimizer, cfg.batch_size, generator,
                                 epoch, after_step=after_step)
            except TrainingError as err:
                raise TrainingError(f"{desc}: {err}") from None
            masked.temperature *= growth
            row = {"epoch": epoch, "loss": loss, "density": masked.subnetwork().density(),
                   "temperature": masked.temperature}
            if evaluate is not None:
                row["val"] = score = evaluate(masked)
                if best is None or score > best[0]:
                    best = (score, epoch, masked.mask_state())
            history.append(row)
        meta = {"temperature": str(masked.temperature)}
        if cfg.keep_best and best is not None:
            masked.load_mask_state(best[2])
            meta["best_epoch"] = str(best[1])
        return masked.subnetwork(meta), history
    finally:
        masked.detach_masks()
