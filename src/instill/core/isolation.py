"""Parameter isolation for continual learning: each task owns weights that later tasks never move.

An `Allocation` records, per targeted weight, which task owns it (-1 = free). `isolate` builds a
copy to train task t: weights of tasks < t live in buffers (the `FrozenSubnetwork`
parametrization), so no optimizer, weight decay included, can move them; `task_view` evaluates
task t with only the weights of tasks <= t (PackNet's inference). `packnet_prune` picks a task's
weights among the free ones by magnitude (Mallya & Lazebnik 2018).

Untargeted parameters (embeddings, norms, biases unless targeted) belong to task 0: trainable
while isolating task 0, frozen bit-for-bit afterwards, and norm layers with running statistics
then run in eval mode so the statistics stay fixed too. Parameters named in `per_task` (a
per-task head) train in every task instead; the caller keeps each task's copy (`task_state`)
and passes it to `task_view`.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _NormBase

from instill.errors import ConfigError, FileFormatError, InstillError, SubnetworkMismatchError
from instill.methods.config import Targets

from .subnetwork import Subnetwork
from .targets import add_parametrization, fingerprint, parameter_sites, select_parameters
from .transplant import FrozenSubnetwork, _require_plain, apply_subnetwork, fresh_init

FORMAT = "instill.allocation"
VERSION = "1"
FREE = -1
MAX_TASK = int(torch.iinfo(torch.int16).max)


class IsolationError(InstillError, ValueError):
    """Tasks used out of order: a task would change or gain weights another task relies on."""


class CapacityError(IsolationError):
    """The model has no room for a task: weights already owned, or too few free weights left."""


@dataclass(frozen=True, eq=False)
class Allocation:
    """Owner of every targeted weight (int16: -1 free, t owned by task t); `claim` returns a
    new Allocation, so a stored one never changes under the caller."""

    owners: dict[str, Tensor]
    fingerprint: dict[str, tuple[int, ...]]
    metadata: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, owner in self.owners.items():
            if owner.dtype != torch.int16:
                raise TypeError(f"owner map {name!r} must be int16, got {owner.dtype}")
            if tuple(owner.shape) != tuple(self.fingerprint.get(name, owner.shape)):
                raise SubnetworkMismatchError(
                    f"owner map {name!r} has shape {tuple(owner.shape)} but the model's "
                    f"parameter has {tuple(self.fingerprint[name])}")
            if owner.numel() and int(owner.min()) < FREE:
                raise ValueError(f"owner map {name!r} holds {int(owner.min())}; owners are -1 "
                                 "(free) or a task index >= 0")

    @classmethod
    def from_model(cls, model: nn.Module, targets: Targets = None, exclude: Targets = None,
                   mask_bias: bool = False) -> Allocation:
        """Everything free, over the parameters `select_parameters` targets (as MaskConfig)."""
        params = dict(model.named_parameters())
        names = select_parameters(model, targets, exclude, mask_bias)
        owners = {n: torch.full(params[n].shape, FREE, dtype=torch.int16) for n in names}
        return cls(owners, fingerprint(model))

    # -- views -----------------------------------------------------------------------------
    def _sub(self, pick: Callable[[Tensor], Tensor], **meta: str) -> Subnetwork:
        return Subnetwork({n: pick(o) for n, o in self.owners.items()}, dict(self.fingerprint),
                          meta)

    def free(self) -> Subnetwork:
        """The weights no task owns yet."""
        return self._sub(lambda o: o == FREE, role="free")

    def owned(self, task: int) -> Subnetwork:
        """The weights task `task` owns."""
        return self._sub(lambda o: o == task, role="owned", task=str(task))

    def upto(self, task: int) -> Subnetwork:
        """The weights of tasks 0..task: what task `task` computes with."""
        return self._sub(lambda o: (o != FREE) & (o <= task), role="upto", task=str(task))

    def tasks(self) -> list[int]:
        """Tasks that own at least one weight, ascending."""
        found = set()
        for owner in self.owners.values():
            found.update(int(t) for t in owner.unique() if t != FREE)
        return sorted(found)

    def last_task(self) -> int:
        """The highest task owning weights (-1 when all are free)."""
        return max((int(o.max()) for o in self.owners.values() if o.numel()), default=FREE)

    # -- claiming --------------------------------------------------------------------------
    def claim(self, task: int, sub: Subnetwork) -> Allocation:
        """A new Allocation where task `task` also owns `sub`, which must lie in the free
        weights; tasks claim in order (a later task's view must never gain weights)."""
        _check_task(task)
        if sub.fingerprint and dict(sub.fingerprint) != dict(self.fingerprint):
            raise SubnetworkMismatchError("the subnetwork comes from another architecture than "
                                          "the allocation (parameter names or shapes differ)")
        if task < self.last_task():
            raise IsolationError(f"task {task} claims weights after task {self.last_task()} did; "
                                "claim tasks in order (0, 1, 2, ...)")
        free = self.free()
        taken = sub - free  # also checks both cover the same parameters
        if taken.kept():
            owners = sorted({int(t) for n, m in taken.masks.items()
                             for t in self.owners[n][m.cpu()].unique()})
            raise CapacityError(
                f"task {task} claims {taken.kept()} weights that tasks {owners} already own; "
                "claim only free ones, e.g. `sub & allocation.free()`")
        owners = {n: torch.where(sub.masks[n].cpu(), torch.tensor(task, dtype=torch.int16), o)
                  for n, o in self.owners.items()}
        return Allocation(owners, dict(self.fingerprint), dict(self.metadata))

    # -- capacity --------------------------------------------------------------------------
    def capacity(self) -> dict:
        """Per task kept count and fraction, and the free count and fraction (they add up)."""
        total = sum(o.numel() for o in self.owners.values())
        counts: dict[int, int] = {}
        for owner in self.owners.values():
            values, n = owner.unique(return_counts=True)
            for t, c in zip(values.tolist(), n.tolist(), strict=True):
                counts[t] = counts.get(t, 0) + c
        free = counts.pop(FREE, 0)
        share = max(total, 1)
        return {"total": total, "free": free, "free_fraction": free / share,
                "tasks": {t: {"kept": c, "fraction": c / share} for t, c in sorted(counts.items())}}

    def check_capacity(self, min_free_fraction: float) -> dict:
        """Raise CapacityError unless at least `min_free_fraction` of the weights are free."""
        cap = self.capacity()
        if cap["free_fraction"] < min_free_fraction:
            raise CapacityError(
                f"only {cap['free']} of {cap['total']} targeted weights "
                f"({cap['free_fraction']:.1%}) are free after tasks {list(cap['tasks'])}, but "
                f"{min_free_fraction:.1%} are needed for the next task; use fewer tasks, a "
                "smaller kept fraction per task, or a bigger model")
        return cap

    # -- files -----------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        """Write the owner maps (safetensors, int16) with fingerprint/metadata as JSON."""
        from instill.storage import save_tensors

        meta = {"format": FORMAT, "version": VERSION,
                "fingerprint": json.dumps({k: list(v) for k, v in self.fingerprint.items()}),
                "metadata": json.dumps(self.metadata, sort_keys=True)}
        save_tensors(path, {n: o.contiguous() for n, o in self.owners.items()}, meta)

    @classmethod
    def load(cls, path: str | Path) -> Allocation:
        """Read a file written by `save`; never unpickles."""
        from instill.storage import load_tensors

        tensors, meta = load_tensors(path)
        if meta.get("format") != FORMAT:
            raise FileFormatError(f"{path} is a safetensors file but not an instill allocation "
                                  f"(no 'format: {FORMAT}' in its header)")
        if meta.get("version") != VERSION:
            raise FileFormatError(f"{path} is allocation format version {meta.get('version')}; "
                                  f"this instill reads version {VERSION}")
        try:
            prints = {k: tuple(v) for k, v in json.loads(meta["fingerprint"]).items()}
            metadata = json.loads(meta.get("metadata", "{}"))
            return cls(tensors, prints, metadata)
        except (KeyError, ValueError, TypeError) as err:
            raise FileFormatError(f"{path}: damaged allocation ({err})") from None


def _check_task(task: int) -> None:
    if not isinstance(task, int) or not 0 <= task <= MAX_TASK:
        raise IsolationError(f"task must be an int in [0, {MAX_TASK}], got {task!r}")


def _check_fits(model: nn.Module, allocation: Allocation, what: str) -> None:
    _require_plain(model, what)
    if fingerprint(model) != dict(allocation.fingerprint):
        raise SubnetworkMismatchError(f"{what}: the model's parameter names or shapes differ "
                                      "from those of the model the allocation was made for")


def _per_task_names(model: nn.Module, allocation: Allocation, per_task: Sequence[str]) -> set:
    """Parameter and buffer names under each `per_task` entry (a name or a module prefix)."""
    names = set(dict(model.named_parameters())) | set(dict(model.named_buffers()))
    chosen = set()
    for entry in per_task:
        hit = {n for n in names if n == entry or n.startswith(entry + ".")}
        if not hit:
            raise SubnetworkMismatchError(f"per_task entry {entry!r} names no parameter or "
                                          f"module of {type(model).__name__}")
        chosen |= hit
    clash = sorted(chosen & set(allocation.owners))
    if clash:
        raise IsolationError(f"per_task names targeted weights ({', '.join(clash[:3])}); a "
                             "per-task head must be excluded from the allocation's targets")
    return chosen


def _freeze_norm_statistics(module: nn.Module, _args: tuple) -> None:
    """Forward pre-hook: run a frozen norm layer in eval mode, so its statistics never move."""
    module.training = False


def isolate(model: nn.Module, allocation: Allocation, task: int, *, reinit_free: bool,
            seed: int | None = None, train_free: bool = True,
            per_task: Sequence[str] = ()) -> nn.Module:
    """A copy of `model` to train task `task`: weights of tasks < task frozen bit-for-bit.

    Free weights train (freshly initialized if `reinit_free`, from `fresh_init(model, seed)`);
    with `train_free=False` they are held at zero instead, so only the weights `task` already
    owns train (PackNet's retraining after pruning). Untargeted parameters train for task 0 and
    are frozen after it, except those under `per_task`. `instill.bake` returns a plain model.
    """
    _check_task(task)
    _check_fits(model, allocation, "isolate")
    if allocation.last_task() > task:
        raise IsolationError(f"task {allocation.last_task()} already owns weights; training task "
                            f"{task} now would change what task {allocation.last_task()} uses")
    if reinit_free and not train_free:
        raise IsolationError("reinit_free=True has no effect with train_free=False (free "
                             "weights are held at zero); pass reinit_free=False")
    heads = _per_task_names(model, allocation, per_task)
    new = copy.deepcopy(model)
    fresh = dict(fresh_init(model, seed).named_parameters()) if reinit_free else {}
    params, sites = dict(model.named_parameters()), parameter_sites(new)
    trainable = 0
    for name, owner in allocation.owners.items():
        value = params[name].detach()
        frozen_mask = ((owner != FREE) & (owner < task)).to(value.device)
        free = (owner == FREE).to(value.device)
        if not train_free:
            frozen_mask |= free
        frozen = torch.where(frozen_mask & ~free, value, torch.zeros_like(value))
        param = new.get_parameter(name)
        with torch.no_grad():
            param.copy_(torch.where(free, fresh[name].detach(), value) if reinit_free else value)
        param.requires_grad_(not bool(frozen_mask.all()))  # no optimizer state for nothing
        add_parametrization(new, sites[name], FrozenSubnetwork(frozen.clone(), frozen_mask))
        trainable += int((~frozen_mask).sum())
    untargeted = {n: w for n, w in sites.items() if n not in allocation.owners}
    for name, where in untargeted.items():  # task 0's after task 0, unless a per-task head
        param, shared = new.get_parameter(name), task > 0 and name not in heads
        param.requires_grad_(not shared)
        if shared:
            value = param.detach().clone()
            add_parametrization(new, where, FrozenSubnetwork(value, torch.ones_like(value) > 0))
        else:
            trainable += param.numel()
    for mod_name, module in new.named_modules():
        stats = isinstance(module, _NormBase) and module.track_running_stats
        if task > 0 and stats and f"{mod_name}.running_mean" not in heads \
                and not getattr(module, "_instill_frozen_norm", False):
            module.register_forward_pre_hook(_freeze_norm_statistics)
            module._instill_frozen_norm = True
    if trainable == 0:
        raise CapacityError(f"nothing is left to train for task {task}: every weight is frozen;"
                            " use fewer tasks, a smaller kept fraction, or a bigger model")
    return new


@contextmanager
def task_view(model: nn.Module, allocation: Allocation, task: int, *,
              head: Mapping[str, Tensor] | None = None) -> Iterator[nn.Module]:
    """Evaluate task `task` with exactly the weights of tasks <= task (later tasks' and free
    weights zeroed) and, if given, its per-task `head` loaded; restored exactly on exit."""
    _check_task(task)
    _check_fits(model, allocation, "task_view")
    state = model.state_dict(keep_vars=True)
    head = dict(head or {})
    unknown = sorted(set(head) - set(state))
    if unknown:
        raise SubnetworkMismatchError(f"head names {', '.join(unknown[:3])}, which "
                                      f"{type(model).__name__} does not have")
    saved = {n: state[n].detach().clone() for n in head}
    try:
        with torch.no_grad():
            for name, value in head.items():
                state[name].copy_(value)
        with apply_subnetwork(model, allocation.upto(task), "keep"):
            yield model
    finally:
        with torch.no_grad():
            for name, value in saved.items():
                state[name].copy_(value)


def task_state(model: nn.Module, per_task: Sequence[str]) -> dict[str, Tensor]:
    """Copies of the parameters and buffers under `per_task` (a task's head) of a plain model."""
    state = model.state_dict()
    chosen = {n: t.detach().clone() for n, t in state.items()
              if any(n == e or n.startswith(e + ".") for e in per_task)}
    missing = [e for e in per_task if not any(n == e or n.startswith(e + ".") for n in chosen)]
    if missing:
        raise SubnetworkMismatchError(f"per_task entries {missing} name nothing in "
                                      f"{type(model).__name__}")
    return chosen


def packnet_prune(model: nn.Module, allocation: Allocation, task: int,
                  kept_fraction: float) -> Subnetwork:
    """Task `task`'s new weights: per layer, the `round(kept_fraction * free)` free weights of
    largest magnitude (PackNet); owned weights are never chosen."""
    _check_task(task)
    _check_fits(model, allocation, "packnet_prune")
    if not 0 < kept_fraction <= 1:
        raise ConfigError(f"kept_fraction must be in (0, 1], got {kept_fraction}")
    if allocation.free().kept() == 0:
        raise CapacityError(f"no free weights are left for task {task}; use fewer tasks, a "
                            "smaller kept fraction per task, or a bigger model")
    params, masks = dict(model.named_parameters()), {}
    for name, owner in allocation.owners.items():
        free = (owner == FREE).flatten()
        index = free.nonzero().squeeze(1)
        k = round(kept_fraction * index.numel())
        scores = params[name].detach().abs().float().flatten().cpu()[index]
        flat = torch.zeros(owner.numel(), dtype=torch.bool)
        flat[index[scores.topk(k).indices]] = True
        masks[name] = flat.view(owner.shape)
    meta = {"method": "packnet", "task": str(task), "kept_fraction": str(kept_fraction)}
    return Subnetwork(masks, dict(allocation.fingerprint), meta)
