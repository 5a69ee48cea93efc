"""Find the parameters a MaskConfig targets, with clear errors when targets match nothing."""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass

from torch import nn
from torch.nn.utils import parametrize

from instill.errors import TargetError
from instill.methods.config import Targets

_LAYER_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d,
                nn.ConvTranspose2d, nn.ConvTranspose3d)


@dataclass(frozen=True)
class Site:
    """One place a parameter lives: `module.<attr>` (tied parameters live in several)."""

    module_name: str
    attr: str

    @property
    def name(self) -> str:
        return f"{self.module_name}.{self.attr}" if self.module_name else self.attr


def parameter_sites(model: nn.Module) -> dict[str, list[Site]]:
    """Canonical parameter name -> every site holding that same Parameter (ties included)."""
    by_id: dict[int, list[Site]] = defaultdict(list)
    for module_name, module in model.named_modules(remove_duplicate=False):
        for attr, param in module.named_parameters(recurse=False):
            site = Site(module_name, attr)
            if site not in by_id[id(param)]:
                by_id[id(param)].append(site)
    return {sites[0].name: sites for sites in by_id.values()}


def fingerprint(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Parameter names and shapes: identifies the architecture a subnetwork belongs to."""
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def output_dim(module: nn.Module) -> int:
    """The weight dimension of output neurons (HF Conv1D and transposed convs store it 2nd)."""
    if type(module).__name__ == "Conv1D" or isinstance(module, nn.modules.conv._ConvTransposeNd):
        return 1
    return 0


def _is_default_layer(module: nn.Module) -> bool:
    return isinstance(module, _LAYER_TYPES) or (
        type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None
    )


def _matches(name: str, pattern: Targets) -> bool:
    if isinstance(pattern, str):
        return re.fullmatch(pattern, name) is not None
    return any(name == p or name.endswith("." + p) for p in pattern or ())


def _describe(model: nn.Module, names: list[str]) -> str:
    sample = ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")
    return f"{type(model).__name__}, whose weighted modules are named like: {sample}"


def select_modules(model: nn.Module, targets: Targets, exclude: Targets) -> list[str]:
    """Names of the modules whose `weight` gets a mask."""
    weighted = [n for n, m in model.named_modules() if isinstance(
        getattr(m, "weight", None), nn.Parameter)]
    if targets is None:
        embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
        chosen = [n for n in weighted if _is_default_layer(model.get_submodule(n))
                  and id(model.get_submodule(n).weight) not in embeddings]
    elif isinstance(targets, str):
        chosen = [n for n in weighted if _matches(n, targets)]
        if not chosen:
            raise TargetError(
                f"targets regex {targets!r} matches no module with a weight in "
                f"{_describe(model, weighted)}; the regex must match the whole module name"
            )
    else:
        for entry in targets:
            if not any(_matches(n, [entry]) for n in weighted):
                raise TargetError(
                    f"targets entry {entry!r} matches no module with a weight in "
                    f"{_describe(model, weighted)}; use a module name or a dotted suffix of one"
                )
        chosen = [n for n in weighted if _matches(n, targets)]
    if exclude is not None:
        chosen = [n for n in chosen if not _matches(n, exclude)]
    if not chosen:
        raise TargetError(f"exclude={exclude!r} removes every targeted module; nothing to mask")
    return chosen


def select_parameters(model: nn.Module, targets: Targets, exclude: Targets,
                      mask_bias: bool) -> dict[str, list[Site]]:
    """Canonical name -> sites of each targeted parameter; tied ones must be targeted whole."""
    modules = select_modules(model, targets, exclude)
    wanted = {Site(m, "weight") for m in modules}
    if mask_bias:
        wanted |= {Site(m, "bias") for m in modules
                   if isinstance(getattr(model.get_submodule(m), "bias", None), nn.Parameter)}
    selected = {}
    for name, sites in parameter_sites(model).items():
        hit = [s for s in sites if s in wanted]
        if not hit:
            continue
        missing = [s.name for s in sites if s not in hit]
        if missing:
            raise TargetError(
                f"{hit[0].name} is tied to {', '.join(missing)} (the same tensor); target all of "
                "them (they then share one mask) or none, e.g. add them to `targets` or `exclude`"
            )
        selected[name] = sites
    return selected


def add_parametrization(model: nn.Module, sites: list[Site], parametrization: nn.Module) -> None:
    """Register one parametrization at every site of a (possibly tied) parameter."""
    for site in sites:
        module = model.get_submodule(site.module_name)
        if not hasattr(module, "_instill_order"):
            module._instill_order = list(module._parameters)
        parametrize.register_parametrization(module, site.attr, parametrization)


def strip_parametrizations(module: nn.Module) -> None:
    """Undo `add_parametrization` on a module: put each original Parameter back, in the
    module's original parameter order.

    Unlike `parametrize.remove_parametrizations`, this never edits the generated
    `Parametrized*` class, which deep copies of the module share.
    """
    originals = {attr: plist.original for attr, plist in module.parametrizations.items()}
    module.__class__ = module.__class__.__bases__[0]
    del module._modules["parametrizations"]
    module._parameters.update(originals)
    order = module.__dict__.pop("_instill_order", list(module._parameters))
    rest = [k for k in module._parameters if k not in order]
    module._parameters = {k: module._parameters[k] for k in order + rest
                          if k in module._parameters}
