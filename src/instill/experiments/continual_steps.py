"""Pieces of one continual step that are not bookkeeping: discovery among the free weights,
the targets of an allocation, which heads train, and the replay training set."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import replace

import torch
from torch import Tensor, nn

from instill.core import Subnetwork, attach_masks
from instill.core.isolation import Allocation
from instill.methods.config import MaskConfig
from instill.tasks.task_sequences import Data, TaskSequence, replay_buffer
from instill.training import DiscoveryConfig, FitConfig, make_optimizer, run_epoch

HELD_ON = 10.0  # mask logit of weights earlier tasks own: sigmoid(10 * beta) ~ 1, never trained
LossFn = Callable[[nn.Module, Sequence[Tensor]], Tensor]


def discover_free(model: nn.Module, alloc: Allocation, data: Data, loss_fn: LossFn,
                  cfg: DiscoveryConfig, seed: int) -> Subnetwork:
    """Continuous sparsification over the free weights of `model`; weights earlier tasks own
    are held on (logit HELD_ON, gradient zeroed), so the mask is learnt for task t's view."""
    masked = attach_masks(model, cfg.mask)
    free = alloc.free().masks
    try:
        for name, mask in masked.masks.items():
            keep = free[name].to(mask.logits.device)
            with torch.no_grad():
                mask.logits.masked_fill_(~keep, HELD_ON)
            mask.logits.register_hook(lambda g, k=keep: g * k)
        growth = cfg.final_temperature ** (1 / cfg.epochs)
        opt = make_optimizer(masked.mask_parameters(), FitConfig(
            lr=cfg.lr, weight_decay=cfg.mask.weight_decay, fused=cfg.fused))
        gen = torch.Generator().manual_seed(seed)

        def penalized(m: nn.Module, batch: Sequence[Tensor]) -> Tensor:
            return loss_fn(m, batch) + masked.l0_penalty()

        for epoch in range(cfg.epochs):
            run_epoch(masked, list(data), penalized, opt, cfg.batch_size, gen, epoch)
            masked.temperature *= growth
        return masked.subnetwork() & alloc.free()
    finally:
        masked.detach_masks()


def allocation_mask(mask: MaskConfig, seq: TaskSequence) -> MaskConfig:
    """The mask config with every task's head excluded: its targets are the allocation's
    (heads are per-task parameters, never shared weights)."""
    heads, exclude = seq.untargeted(), mask.exclude
    if not heads:
        return mask
    if exclude is None:
        exclude = heads
    elif isinstance(exclude, str):
        exclude = "|".join([f"(?:{exclude})", *map(re.escape, heads)])
    else:
        exclude = [*exclude, *heads]
    return replace(mask, exclude=exclude)


def train_heads(model: nn.Module, seq: TaskSequence, tasks: Sequence[int]) -> nn.Module:
    """Only the heads of `tasks` train (the others keep requires_grad False, so no optimizer,
    weight decay included, touches them); every other parameter is left as it is."""
    mine = {h for t in tasks for h in seq.heads(t)}
    for head in {h for t in range(len(seq.names)) for h in seq.heads(t)} - mine:
        model.get_submodule(head).requires_grad_(False)
    return model


def replay_data(seq: TaskSequence, task: int, size: int, seed: int) -> Data:
    """Task `task`'s training data plus a buffer of `size` earlier examples, tiled to the
    size of the task's own data, so each epoch shows about as many replayed rows as new ones."""
    own = seq.train(task)
    if task == 0:
        return own
    buffer, _ = replay_buffer([seq.pool(i) for i in range(task)], size, seed)
    tiles = max(1, round(len(own[0]) / len(buffer[0])))
    return tuple(torch.cat([o, b.repeat(tiles, *([1] * (b.dim() - 1)))])
                 for o, b in zip(own, buffer, strict=True))


def keep_free_values(final: nn.Module, trained: nn.Module, alloc: Allocation) -> None:
    """Copy the free weights' trained values into `final` (the next task starts from them
    unless it re-initializes them)."""
    with torch.no_grad():
        for name, mask in alloc.free().masks.items():
            final.get_parameter(name).copy_(torch.where(
                mask.to(final.get_parameter(name).device), trained.get_parameter(name),
                final.get_parameter(name)))


__all__ = ["HELD_ON", "allocation_mask", "discover_free", "keep_free_values", "replay_data",
           "train_heads"]
