"""Train K models of one architecture together: one vmapped step over their stacked weights.

Each model keeps its own initialization, data order (its own seed's `batches` permutation),
dropout draws (`vmap(randomness="different")`), frozen transplant mask, AdamW state, early
stopping and best epoch; `fit_batched` returns what K separate `fit` calls would, up to float
rounding (batched kernels round differently) and dropout's draws (vmap draws them for the whole
stack), and leaves each model as `fit` leaves it.

The step is `vmap(grad_and_value(loss))` over `functional_call` of one plain copy of the
architecture (`torch.func`). A transplant's `where(mask, W_sub, W_new)` is applied inside that
step, from K stacked masks and frozen values that no optimizer sees. The optimizer of `fit`
(`make_optimizer`) runs on the stacked tensors: AdamW and SGD are elementwise, so this is each
model's own update (bit for bit unfused; fused rounds a slice's tail differently). A model that
stops leaves the stack (with its optimizer state rows), so it costs nothing afterwards.

It pays only where per-op overhead, not arithmetic, sets the pace (benchmarks/batched.py, 2-core
CPU, 1 thread): the quick GPT-2 trains ~1.5x the models per minute at K=16 (~1.0x at K=4, ~0.55x
at K=1: use `fit` there); the quick ResNet ~1.05x at K=16, as vmapped convolutions become
grouped ones, which are slower here than K separate convolutions.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad_and_value, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.utils import parametrize
from tqdm.auto import tqdm

from instill.core import Subnetwork, attach_masks
from instill.core.transplant import FrozenSubnetwork, bake
from instill.errors import ConfigError, TrainingError
from instill.models.dropout import counter_dropout, step_key
from instill.models.dropout import sites as dropout_sites
from instill.training import (
    DiscoveryConfig,
    EvalFn,
    FitConfig,
    FitResult,
    LossFn,
    batches,
    kept_fraction,
    make_optimizer,
)

MaskSpec = Mapping[str, Tensor] | Subnetwork | None


class _Bound:
    """A module called with given tensors (`functional_call`), so a loss_fn written for
    `loss_fn(model, batch)` runs unchanged inside vmap; attributes come from the module."""

    def __init__(self, module: nn.Module, tensors: dict[str, Tensor]) -> None:
        self._module, self._tensors = module, tensors

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return functional_call(self._module, self._tensors, args, kwargs, tie_weights=True)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._module, name)


@dataclass
class _Member:
    """One model: where its trained values go back, and its early-stopping bookkeeping."""

    model: nn.Module
    slots: dict[str, tuple[Tensor, Tensor | None, Tensor | None]]  # target, mask, frozen
    result: FitResult = field(default_factory=FitResult)
    best: dict[str, Tensor] | None = None
    stale: int = 0
    settled: int = 0

    def write(self, state: Mapping[str, Tensor]) -> None:
        """Put trained values into the model (a plain model's masked entries stay frozen)."""
        with torch.no_grad():
            for name, value in state.items():
                target, mask, frozen = self.slots[name]
                target.copy_(value if mask is None else torch.where(mask, frozen, value))


def _sites(model: nn.Module, name: str, given: Tensor | None
           ) -> tuple[Tensor, Tensor | None, Tensor | None, bool]:
    """(trainable tensor, mask, frozen, write-effective) of parameter `name` of `model`."""
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    if parametrize.is_parametrized(module, attr):
        plist = module.parametrizations[attr]
        if len(plist) != 1 or not isinstance(plist[0], FrozenSubnetwork):
            raise ConfigError(f"{name} has a parametrization other than a transplant's frozen "
                              "subnetwork (e.g. continuous masks): detach or bake it first")
        if given is not None:
            raise ConfigError(f"{name} is already frozen by a transplant; pass no mask for it")
        return plist.original, plist[0].mask, plist[0].frozen, False
    param = getattr(module, attr)
    if given is None:
        return param, None, None, False
    mask = given.to(param.device, torch.bool)
    if mask.shape != param.shape:
        raise ConfigError(f"mask of {name} has shape {tuple(mask.shape)}, the parameter "
                          f"{tuple(param.shape)}")
    return param, mask, torch.where(mask, param.detach(), torch.zeros_like(param)), True


def _check(models: Sequence[nn.Module], datas: Sequence[Sequence[Tensor]], seeds: Sequence[int],
           evaluate: Sequence[EvalFn] | None, masks: Sequence[MaskSpec] | None) -> int:
    """Refuse mismatched inputs; returns the common number of examples."""
    if not models:
        raise ConfigError("fit_batched needs at least one model")
    for what, seq in (("datas", datas), ("seeds", seeds), ("evaluate", evaluate),
                      ("masks", masks)):
        if seq is not None and len(seq) != len(models):
            raise ConfigError(f"{what} has {len(seq)} entries for {len(models)} models; give "
                              "one per model")
    sigs = [[(len(t), tuple(t.shape[1:]), str(t.dtype)) for t in data] for data in datas]
    if not sigs[0] or len({len(t) for t in datas[0]}) != 1:
        raise ConfigError("each model's data must be one or more tensors with the same number "
                          "of examples")
    for k, sig in enumerate(sigs):
        if sig != sigs[0]:
            raise ConfigError(f"datas[{k}] is {sig}, datas[0] {sigs[0]} (examples, shape, dtype "
                              "per tensor): every model needs as many examples, so batches align")
    n = len(datas[0][0])
    if any(hasattr(m, "detach_masks") for m in models):
        raise ConfigError("a model has continuous masks attached: call detach_masks() first")
    return n


#: A functional validation score of one model on its batch (called inside vmap).
ScoreFn = Callable[[nn.Module, Sequence[Tensor]], Tensor]


def fit_batched(models: Sequence[nn.Module], datas: Sequence[Sequence[Tensor]],
                loss_fn: LossFn, cfg: FitConfig, *, seeds: Sequence[int],
                evaluate: Sequence[EvalFn] | None = None,
                masks: Sequence[MaskSpec] | None = None,
                score: tuple[ScoreFn, Sequence[Sequence[Tensor]]] | None = None,
                desc: str = "train batched") -> list[FitResult]:
    """Train `models` (same architecture, plain or transplants) together; model k as
    `fit(models[k], datas[k], loss_fn, cfg, evaluate=evaluate[k], seed=seeds[k])` would.

    Every `datas[k]` must hold the same number of examples (batches align). `loss_fn(model,
    batch)` must be functional (no `.item()`, no in-place edits of the model): it is called inside
    `vmap`. `masks[k]` (a Subnetwork or name -> bool mask) freezes those entries of a plain model
    at their current values, as a transplant does. Dropout draws come from torch's global
    generator (seed it for reproducible runs) and depend on which models share the stack.
    Each model ends in eval mode holding its best state. A NaN loss in any model raises
    TrainingError, naming it, and every model keeps its best (else current) state.
    `score=(fn, val_datas)` validates the whole stack in one vmapped forward pass instead of
    calling `evaluate` model by model (`fn(model, batch)` returns the score as a tensor,
    functionally; every model's validation data must have as many examples).
    """
    n = _check(models, datas, seeds, evaluate, masks)
    if score is not None:
        _check(models, score[1], seeds, None, None)
    template = bake(models[0]).train()
    names = [name for name, _ in template.named_parameters()]
    buffer_names = [name for name, _ in template.named_buffers()]
    with ExitStack() as stack:
        keys = []
        if cfg.dropout_rng == "counter":  # the masks `fit` draws for each model's seed and step
            stack.enter_context(counter_dropout(template))
            keys = [f"{name}.key" for name in dropout_sites(template)]
        return _fit_stack(models, datas, loss_fn, cfg, seeds, evaluate, masks, desc, n,
                          template, names, buffer_names, keys, score)


def _fit_stack(models: Sequence[nn.Module], datas: Sequence[Sequence[Tensor]], loss_fn: LossFn,
               cfg: FitConfig, seeds: Sequence[int], evaluate: Sequence[EvalFn] | None,
               masks: Sequence[MaskSpec] | None, desc: str, n: int, template: nn.Module,
               names: list[str], buffer_names: list[str], keys: list[str],
               score: tuple[ScoreFn, Sequence[Sequence[Tensor]]] | None) -> list[FitResult]:
    """`fit_batched` on a prepared template; `keys` name its counter-dropout key buffers."""
    members, values, mask_rows, frozen_rows = [], [], [], []
    for k, model in enumerate(models):
        spec = masks[k] if masks is not None else None
        spec = spec.masks if isinstance(spec, Subnetwork) else (spec or {})
        unknown = sorted(set(spec) - set(names))
        if unknown:
            raise ConfigError(f"masks[{k}] names parameters the model lacks: {unknown[:4]}")
        slots, vals, mk, fz = {}, {}, {}, {}
        for name, ref in template.named_parameters():
            tensor, mask, frozen, effective = _sites(model, name, spec.get(name))
            if tensor.shape != ref.shape:
                raise ConfigError(f"models[{k}] is another architecture: {name} has shape "
                                  f"{tuple(tensor.shape)}, models[0] {tuple(ref.shape)}")
            slots[name] = (tensor, mask if effective else None, frozen if effective else None)
            vals[name] = tensor
            if mask is not None:
                mk[name], fz[name] = mask, frozen
        for name in buffer_names:
            slots[name] = (model.get_buffer(name), None, None)
            vals[name] = model.get_buffer(name)
        members.append(_Member(model, slots))
        values.append(vals)
        mask_rows.append(mk)
        frozen_rows.append(fz)
    trainable = {name: values[0][name].requires_grad for name in names}
    if any(vals[name].requires_grad != trainable[name] for vals in values for name in names):
        raise ConfigError("models differ in which parameters require grad; they must agree")
    masked = sorted({name for row in mask_rows for name in row})

    def stack(name: str, rows: list[dict[str, Tensor]] | None = None, fill=None) -> Tensor:
        """Each model's `name` (from `rows[k]`, else `fill` of its parameter), stacked."""
        got = [values[k][name] if rows is None else
               rows[k][name] if name in rows[k] else fill(values[k][name])
               for k in range(len(models))]
        return torch.stack([t.detach() for t in got])

    params = {name: stack(name).requires_grad_() for name in names if trainable[name]}
    consts = {name: stack(name) for name in names if not trainable[name]}
    bufs = {name: stack(name) for name in buffer_names}
    mask_st = {name: stack(name, mask_rows, lambda t: torch.zeros_like(t, dtype=torch.bool))
               for name in masked}
    frozen_st = {name: stack(name, frozen_rows, torch.zeros_like) for name in masked}
    data = [torch.stack([d[t] for d in datas]) for t in range(len(datas[0]))]
    gens = [torch.Generator().manual_seed(s) for s in seeds]

    def one_loss(p: dict[str, Tensor], c: dict[str, Tensor], b: dict[str, Tensor],
                 m: dict[str, Tensor], f: dict[str, Tensor], batch: list[Tensor]) -> Tensor:
        weights = {**c, **p}
        for name in m:
            weights[name] = torch.where(m[name], f[name], weights[name])
        return loss_fn(cast(nn.Module, _Bound(template, {**weights, **b})), batch)

    step = vmap(grad_and_value(one_loss), randomness="different")
    val = [torch.stack([d[t] for d in score[1]]) for t in range(len(score[1][0]))] \
        if score is not None else []

    def one_score(p: dict[str, Tensor], c: dict[str, Tensor], b: dict[str, Tensor],
                  m: dict[str, Tensor], f: dict[str, Tensor], batch: list[Tensor]) -> Tensor:
        weights = {**c, **p}
        for name in m:
            weights[name] = torch.where(m[name], f[name], weights[name])
        return score[0](cast(nn.Module, _Bound(template, {**weights, **b})), batch)  # type: ignore[index]

    def stack_scores(rows: Tensor) -> list[float]:
        """Every active model's validation score, in one vmapped forward in eval mode."""
        template.eval()
        try:
            with torch.no_grad(), sdpa_kernel([SDPBackend.MATH]):
                return vmap(one_score)(params, consts, bufs, mask_st, frozen_st,
                                       [t[rows.to(t.device)] for t in val]).tolist()
        finally:
            template.train()
    optimizer = make_optimizer(list(params.values()), cfg)
    active = list(range(len(models)))  # model index of each row of the stacks
    finished: dict[int, dict[str, Tensor]] = {}

    def row_state(j: int, clone: bool = True) -> dict[str, Tensor]:
        """Row j's trained tensors: a copy, or views to write straight into its model."""
        return {name: t[j].detach().clone() if clone else t[j].detach()
                for name, t in (*params.items(), *bufs.items())}

    try:
        for epoch in tqdm(range(cfg.epochs), desc=desc, leave=False, disable=None):
            rows = torch.tensor(active)
            orders = [list(batches(n, cfg.batch_size, gens[i])) for i in active]
            totals = [0.0] * len(active)
            for s, idx in enumerate(zip(*orders, strict=True)):
                pick = torch.stack(idx)
                batch = [t[rows[:, None], pick] for t in data]
                keyed = dict(bufs)
                if keys:
                    step_keys = torch.tensor([step_key(seeds[i], epoch * len(orders[0]) + s)
                                              for i in active], device=data[0].device)
                    keyed |= dict.fromkeys(keys, step_keys)
                # torch.func takes its own gradients; outside no_grad the stack's weights would
                # also record a graph of them, and `.grad` would hold it in a reference cycle
                # that Python's collector cannot see (a stack's worth of memory per step)
                with torch.no_grad(), sdpa_kernel([SDPBackend.MATH]):  # fused SDPA: no vmap
                    grads, losses = step(params, consts, keyed, mask_st, frozen_st, batch)
                bad = (~torch.isfinite(losses)).nonzero().flatten().tolist()
                if bad:
                    raise TrainingError(
                        f"{desc}: model {active[bad[0]]}: the loss became "
                        f"{losses[bad[0]].item()} at epoch {epoch}, step {s}; lower the learning "
                        "rate or check the data. The best state so far is kept.")
                for name, p in params.items():
                    p.grad = grads[name].contiguous()  # fused AdamW reads raw memory
                optimizer.step()
                for j, value in enumerate(losses.tolist()):
                    totals[j] += value * len(idx[j])
            last = epoch == cfg.epochs - 1
            due = (evaluate is not None or score is not None) and (
                epoch % cfg.eval_every == cfg.eval_every - 1 or last)
            scores = stack_scores(rows) if due and score is not None else None
            stops = []
            for j, i in enumerate(active):
                member, row = members[i], {"epoch": epoch, "loss": totals[j] / n}
                if due:
                    if scores is None:
                        member.write(row_state(j, clone=False))
                        member.model.eval()
                    row["val"] = value = scores[j] if scores is not None else \
                        evaluate[i](member.model)  # type: ignore[index]
                    reached = cfg.stop_at is not None and value >= cfg.stop_at
                    member.settled = member.settled + 1 if reached else 0
                    if value > member.result.best_score:
                        member.result.best_score, member.result.best_epoch = value, epoch
                        member.best, member.stale = row_state(j), 0
                    else:
                        member.stale += 1
                member.result.history.append(row)
                if last or (cfg.patience is not None and member.stale >= cfg.patience) \
                        or member.settled >= cfg.stop_after:
                    finished[i] = member.best if member.best is not None else row_state(j)
                    stops.append(j)
            if stops:
                keep = [j for j in range(len(active)) if j not in stops]
                active = [active[j] for j in keep]
                if not active:
                    break
                params, consts, bufs, mask_st, frozen_st, optimizer = _select(
                    keep, params, consts, bufs, mask_st, frozen_st, optimizer, cfg)
    finally:
        for j, i in enumerate(active):  # an exception: keep the best (else current) state
            finished.setdefault(i, members[i].best or row_state(j))
        for i, member in enumerate(members):
            member.write(finished[i])
            member.model.eval()
    for member in members:
        if evaluate is None and score is None:
            member.result.best_epoch = len(member.result.history) - 1
    return [member.result for member in members]


def _select(keep: list[int], params: dict[str, Tensor], consts: dict[str, Tensor],
            bufs: dict[str, Tensor], mask_st: dict[str, Tensor], frozen_st: dict[str, Tensor],
            optimizer: torch.optim.Optimizer, cfg: FitConfig) -> tuple:
    """The stacks and optimizer restricted to rows `keep` (finished models drop out)."""
    rows = torch.tensor(keep)

    def pick(stacks: dict[str, Tensor]) -> dict[str, Tensor]:
        return {name: t.detach()[rows].clone() for name, t in stacks.items()}

    new = {name: t.requires_grad_() for name, t in pick(params).items()}
    opt = make_optimizer(list(new.values()), cfg)
    for name, old in params.items():
        state = optimizer.state.get(old)
        if state:
            opt.state[new[name]] = {
                key: (v[rows].clone() if isinstance(v, Tensor) and v.dim() > 0
                      else copy.deepcopy(v)) for key, v in state.items()}
    return new, pick(consts), pick(bufs), pick(mask_st), pick(frozen_st), opt




def discover_batched(models: Sequence[nn.Module], datas: Sequence[Sequence[Tensor]],
                     loss_fn: LossFn, cfg: DiscoveryConfig, *, seeds: Sequence[int],
                     evaluate: Sequence[EvalFn] | None = None,
                     desc: str = "discover batched") -> list[tuple[Subnetwork, list[dict]]]:
    """K discoveries (continuous sparsification) over K models of one architecture in one
    vmapped step; model k gets what `discover(models[k], datas[k], ..., seed=seeds[k])` would
    return, within float rounding. The models are returned untouched."""
    if (cfg.mask.method, cfg.mask.granularity) != ("continuous_sparsification", "weight"):
        raise ConfigError("discover_batched runs continuous sparsification at weight "
                          "granularity; use `discover` for other mask methods")
    if cfg.keep_best and evaluate is None:
        raise ConfigError("discovery.keep_best needs evaluation data to pick the best epoch")
    n = _check(models, datas, seeds, evaluate, None)
    template = copy.deepcopy(models[0]).eval()
    weights = [{k: p.detach() for k, p in m.named_parameters()} for m in models]
    buffers = [{k: b for k, b in m.named_buffers()} for m in models]
    masked = [attach_masks(m, cfg.mask) for m in models]
    try:
        return _discover_stack(masked, template, weights, buffers, datas, loss_fn, cfg, seeds,
                               evaluate, desc, n)
    finally:
        for m in masked:
            m.detach_masks()


def _discover_stack(masked: list, template: nn.Module, weights: list[dict[str, Tensor]],
                    buffers: list[dict[str, Tensor]], datas: Sequence[Sequence[Tensor]],
                    loss_fn: LossFn, cfg: DiscoveryConfig, seeds: Sequence[int],
                    evaluate: Sequence[EvalFn] | None, desc: str,
                    n: int) -> list[tuple[Subnetwork, list[dict]]]:
    """`discover_batched` on models with masks attached (`masked`) and a plain template."""
    names = list(masked[0].masks)
    logits = {k: torch.stack([m.masks[k].logits.detach() for m in masked]).requires_grad_()
              for k in names}
    consts = {k: torch.stack([w[k] for w in weights]) for k in weights[0]}
    bufs = {k: torch.stack([b[k] for b in buffers]) for k in buffers[0]}
    data = [torch.stack([d[t] for d in datas]) for t in range(len(datas[0]))]
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    lam, temperature = cfg.mask.l0_lambda, 1.0

    def one_loss(s: dict[str, Tensor], c: dict[str, Tensor], b: dict[str, Tensor],
                 batch: list[Tensor], temp: float) -> Tensor:
        effective, penalty = dict(c), 0.0
        for k, value in s.items():
            soft = torch.sigmoid(temp * value)
            effective[k] = c[k] * soft.to(c[k].dtype)
            penalty = penalty + soft.sum()
        return loss_fn(cast(nn.Module, _Bound(template, {**effective, **b})), batch) \
            + lam * penalty

    step = vmap(grad_and_value(one_loss), in_dims=(0, 0, 0, 0, None))
    optimizer = make_optimizer(list(logits.values()), FitConfig(
        epochs=1, batch_size=cfg.batch_size, lr=cfg.lr, weight_decay=cfg.mask.weight_decay,
        fused=cfg.fused))
    growth = cfg.final_temperature ** (1 / cfg.epochs)
    steps, done = cfg.epochs * math.ceil(n / cfg.batch_size), 0
    histories: list[list[dict]] = [[] for _ in masked]
    best: list[tuple[float, int, dict[str, Tensor]] | None] = [None] * len(masked)
    rows = torch.arange(len(masked))
    for epoch in tqdm(range(cfg.epochs), desc=desc, leave=False, disable=None):
        orders = [list(batches(n, cfg.batch_size, g)) for g in gens]
        totals = [0.0] * len(masked)
        for s, idx in enumerate(zip(*orders, strict=True)):
            pick = torch.stack(idx)
            batch = [t[rows[:, None], pick] for t in data]
            with torch.no_grad(), sdpa_kernel([SDPBackend.MATH]):  # as in `_fit_stack`
                grads, losses = step(logits, consts, bufs, batch, temperature)
            bad = (~torch.isfinite(losses)).nonzero().flatten().tolist()
            if bad:
                raise TrainingError(f"{desc}: model {bad[0]}: the loss became "
                                    f"{losses[bad[0]].item()} at epoch {epoch}, step {s}; lower "
                                    "the learning rate or check the data")
            for k, p in logits.items():
                p.grad = grads[k].contiguous()
            optimizer.step()
            done += 1
            if cfg.target_density is not None:
                _keep_fraction(logits, kept_fraction(cfg.target_density, done / steps,
                                                     cfg.target_warmup))
            for j, value in enumerate(losses.tolist()):
                totals[j] += value * len(idx[j])
        temperature *= growth
        for j, m in enumerate(masked):
            _load_row(m, logits, j, temperature)
            row = {"epoch": epoch, "loss": totals[j] / n, "density": m.subnetwork().density(),
                   "temperature": temperature}
            if evaluate is not None:
                row["val"] = score = evaluate[j](m)
                if best[j] is None or score > best[j][0]:  # type: ignore[index]
                    best[j] = (score, epoch, m.mask_state())
            histories[j].append(row)
    out = []
    for j, m in enumerate(masked):
        _load_row(m, logits, j, temperature)
        meta = {"temperature": str(temperature)}
        if cfg.keep_best and best[j] is not None:
            m.load_mask_state(best[j][2])  # type: ignore[index]
            meta["best_epoch"] = str(best[j][1])  # type: ignore[index]
        out.append((m.subnetwork(meta), histories[j]))
    return out


def _keep_fraction(logits: dict[str, Tensor], fraction: float) -> None:
    """`MaskedModel.keep_fraction` for every row of stacked logits at once."""
    flat = torch.cat([t.detach().flatten(1) for t in logits.values()], dim=1)
    drop = flat.shape[1] - round(fraction * flat.shape[1])
    below = flat.kthvalue(drop, dim=1).values
    above = flat.kthvalue(drop + 1, dim=1).values
    with torch.no_grad():
        for t in logits.values():
            t.sub_(((below + above) / 2).view(-1, *[1] * (t.dim() - 1)))


def _load_row(masked: Any, logits: dict[str, Tensor], row: int, temperature: float) -> None:
    """Put row `row` of the stacked logits into one model's masks; eval mode (hard masks)."""
    with torch.no_grad():
        for k, t in logits.items():
            masked.masks[k].logits.copy_(t[row])
    masked.temperature = temperature
    masked.eval()


__all__ = ["MaskSpec", "discover_batched", "fit_batched"]
