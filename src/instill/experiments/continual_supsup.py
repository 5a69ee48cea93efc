"""SupSup in the continual experiment (Wortsman et al. 2020): the replicate's initial model is
never trained; each task learns a `top_k` supermask over all of it (heads included) with the
straight-through estimator, evaluated with its task given, and with its task inferred by
one-shot entropy minimisation over the superposition of the masks learnt so far."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from instill.core import MaskConfig, Subnetwork, apply_subnetwork, attach_masks
from instill.core.supermasks import infer_task
from instill.tasks.task_sequences import Data, TaskSequence
from instill.training import FitConfig, fit


def supermask_config(keep: float) -> MaskConfig:
    """A top-k mask keeping `keep` of every linear/conv weight, heads included: SupSup masks
    the whole fixed network."""
    return MaskConfig(method="top_k", keep=keep, weight_decay=0.0)


def untrained_mask(model: nn.Module, keep: float) -> Subnetwork:
    """The mask a task has before training: top-k of the initial scores (`|W|`)."""
    masked = attach_masks(model, supermask_config(keep))
    try:
        return masked.subnetwork({"role": "untrained"})
    finally:
        masked.detach_masks()


def train_supermask(model: nn.Module, seq: TaskSequence, task: int, keep: float,
                    cfg: FitConfig, seed: int, desc: str) -> Subnetwork:
    """Task `task`'s supermask over the fixed `model`, the epoch with the best selection
    accuracy kept; the model's weights never change."""
    masked = attach_masks(model, supermask_config(keep))
    try:
        fit(masked, list(seq.train(task)), seq.loss, cfg, params=masked.mask_parameters(),
            seed=seed, evaluate=lambda m: seq.accuracy(m, seq.select(task)), desc=desc)
        return masked.subnetwork({"method": "supsup", "task": str(task)})
    finally:
        masked.detach_masks()


def masked_accuracy(model: nn.Module, seq: TaskSequence, sub: Subnetwork, data: Data) -> float:
    """Accuracy on `data` with the task given: its mask applied, its head read."""
    with apply_subnetwork(model, sub, "keep") as view:
        return seq.accuracy(view, data)


def mixture_entropy(seq: TaskSequence, batch: Data) -> Callable[[nn.Module, Tensor], Tensor]:
    """Mean entropy of the superposed model's output on `batch`; task i's head is mixed with
    the coefficient of mask i (for a linear head this is the masked head's mixture)."""
    def entropy(model: nn.Module, alpha: Tensor) -> Tensor:
        out = seq.outputs(model, batch)  # heads of the tasks with a mask so far
        logits = (alpha[None, :, None] * out.logits[:, :len(alpha)]).sum(1)
        return -(logits.softmax(-1) * F.log_softmax(logits, -1)).sum(-1).mean()

    return entropy


def split_heads(masks: list[Subnetwork], seq: TaskSequence) -> tuple[list[Subnetwork],
                                                                      Subnetwork]:
    """The masks without the per-task heads (to superpose), and every learnt task's head under
    its own mask (applied as it is): head i is task i's output, weighed by `alpha_i` in the
    mixture, so it must not be mixed with the other tasks' masks of it."""
    def head_of(name: str) -> int | None:
        return next((i for i in range(len(masks)) for h in seq.heads(i)
                     if name.startswith(h + ".")), None)

    owner = {name: head_of(name) for name in masks[0].masks}
    body = [Subnetwork({n: m for n, m in sub.masks.items() if owner[n] is None},
                       dict(sub.fingerprint)) for sub in masks]
    heads = Subnetwork({n: masks[i].masks[n] for n, i in owner.items() if i is not None},
                       dict(masks[0].fingerprint))
    return body, heads


def inferred_accuracy(model: nn.Module, seq: TaskSequence, masks: list[Subnetwork],
                      data: Data, task: int, batch_size: int) -> tuple[float, float]:
    """Accuracy on task `task`'s `data` with the task inferred per batch among `masks`, and
    the share of images whose task was inferred right. As in SupSup's code, a batch whose
    task is inferred wrong counts as wrong, even where tasks share their classes."""
    model.eval()
    hits = right = 0
    body, heads = split_heads(masks, seq)
    for batch in zip(*(d.split(batch_size) for d in data), strict=True):
        with apply_subnetwork(model, heads, "keep"):
            guess = infer_task(model, body, mixture_entropy(seq, batch))
        if guess != task:
            continue
        with torch.no_grad(), apply_subnetwork(model, masks[guess], "keep") as view:
            out = seq.outputs(view, batch)
        hits += int((out.logits[:, guess].argmax(1) == out.labels).sum())
        right += len(out.labels)
    return hits / len(data[0]), right / len(data[0])


__all__ = ["inferred_accuracy", "masked_accuracy", "mixture_entropy", "split_heads",
           "supermask_config", "train_supermask", "untrained_mask"]
