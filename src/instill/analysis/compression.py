"""Compression baselines and files: magnitude masks (checked against torch's pruning),
accuracy-vs-kept-fraction curves, and sparse safetensors files of a baked model."""

from __future__ import annotations

import copy
import math
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize, prune

from instill.core import MaskConfig, Subnetwork, apply_subnetwork
from instill.core.targets import fingerprint, parameter_sites, select_parameters
from instill.errors import (
    ConfigError,
    FileFormatError,
    ModelStateError,
    SubnetworkMismatchError,
    TargetError,
)
from instill.methods import METHODS
from instill.methods.config import Targets
from instill.storage import load_tensors, save_tensors

SPARSE_FORMAT = "instill.sparse_weights"
SPARSE_VERSION = "1"
_META = {"format": SPARSE_FORMAT, "version": SPARSE_VERSION}
INDICES, VALUES, SHAPE = ".__coo_indices__", ".__coo_values__", ".__coo_shape__"
NEGZERO = ".__coo_negzero__"
_SUFFIXES = (INDICES, VALUES, SHAPE, NEGZERO)
_ENTRY_BYTES = 96  # rough safetensors header cost of one more tensor entry
DEFAULT_FRACTIONS = (1.0, 0.5, 0.2, 0.1, 0.05, 0.02, 0.01)


def _require_plain(model: nn.Module, what: str) -> None:
    if any(parametrize.is_parametrized(m) for m in model.modules()):
        raise ModelStateError(f"{what} needs a plain model, but this one has masks or a transplant "
                         "attached; call detach_masks() or instill.bake(model) first")


# --------------------------------------------------------------------------- magnitude masks


def magnitude_mask(model: nn.Module, kept_fraction: float, *,
                   scope: Literal["global", "layer"] = "global", targets: Targets = None,
                   exclude: Targets = None, mask_bias: bool = False) -> Subnetwork:
    """The largest-|w| weights as a Subnetwork, over the parameters discovery would mask with
    the same `targets`/`exclude`/`mask_bias`: the training-free baseline a found subnetwork
    must beat. Exactly the `magnitude` mask method's masks (global ties are all kept)."""
    _require_plain(model, "magnitude_mask")
    cfg = MaskConfig(method="magnitude", keep=kept_fraction, scope=scope, targets=targets,
                     exclude=exclude, mask_bias=mask_bias)
    sites = select_parameters(model, targets, exclude, mask_bias)
    weights = {name: getattr(model.get_submodule(where[0].module_name), where[0].attr)
               for name, where in sites.items()}
    built = METHODS["magnitude"].build(weights, {n: tuple(w.shape) for n, w in weights.items()},
                                       cfg)
    masks = {name: m.hard_mask().detach().to("cpu", copy=True) for name, m in built.items()}
    meta = {"method": "magnitude", "granularity": "weight", "scope": scope,
            "kept_fraction": repr(float(kept_fraction))}
    return Subnetwork(masks, fingerprint(model), meta)


def torch_prune_reference(model: nn.Module, kept_fraction: float,
                          names: Iterable[str] | None = None) -> Subnetwork:
    """Global L1 magnitude pruning by `torch.nn.utils.prune` (on a deep copy) as a Subnetwork:
    an independent reference for `magnitude_mask(scope="global")`, equal up to ties.

    `names` are parameter names (default: the layers discovery masks by default); exactly
    `max(1, round(kept_fraction * total))` weights are kept, as `magnitude_mask` does.
    """
    _require_plain(model, "torch_prune_reference")
    if not 0 < kept_fraction <= 1:
        raise ConfigError(f"kept_fraction must be in (0, 1], got {kept_fraction}")
    names = list(select_parameters(model, None, None, False) if names is None else names)
    if not names:
        raise TargetError("torch_prune_reference needs at least one parameter name")
    pruned = copy.deepcopy(model)
    sites = parameter_sites(pruned)
    where = []
    for name in names:
        if name not in sites:
            raise TargetError(f"{type(model).__name__} has no parameter {name!r}; use names "
                              f"from model.named_parameters(), e.g. {next(iter(sites), '')!r}")
        where.append((pruned.get_submodule(sites[name][0].module_name), sites[name][0].attr))
    total = sum(getattr(module, attr).numel() for module, attr in where)
    keep = max(1, round(kept_fraction * total))
    prune.global_unstructured(where, pruning_method=prune.L1Unstructured, amount=total - keep)
    masks = {name: getattr(module, attr + "_mask").detach().bool().to("cpu", copy=True)
             for name, (module, attr) in zip(names, where, strict=True)}
    return Subnetwork(masks, fingerprint(model), {"method": "torch.prune.L1Unstructured",
                                                  "kept_fraction": repr(float(kept_fraction))})


def pruned(model: nn.Module, sub: Subnetwork) -> nn.Module:
    """A plain copy of `model` with every targeted weight outside `sub` set to zero (what
    `save_sparse` then stores compactly)."""
    sub.check_model(model)
    out = copy.deepcopy(model)
    params = dict(out.named_parameters())
    with torch.no_grad():
        for name, mask in sub.masks.items():
            params[name].mul_(mask.to(params[name].device, params[name].dtype))
    return out


# --------------------------------------------------------------------------- curves


def compression_curve(model: nn.Module,
                      masks: Mapping[float, Subnetwork] | Callable[[float], Subnetwork],
                      metric: Callable[[nn.Module], float],
                      fractions: Iterable[float] | None = None) -> list[dict[str, float]]:
    """`metric` with only each mask's weights kept, by decreasing kept fraction: how much of
    the model the task needs. `masks` maps kept fraction -> Subnetwork, or is a function
    building one (e.g. `lambda f: magnitude_mask(model, f)`) called at each of `fractions`.

    Rows: `{kept_fraction, density (actual), kept, accuracy}`.
    """
    if callable(masks):
        chosen = list(DEFAULT_FRACTIONS if fractions is None else fractions)
        pairs = [(float(f), masks(f)) for f in chosen]
    elif fractions is not None:
        raise ConfigError("compression_curve: pass `fractions` only with a mask function; a "
                          "dict of masks already names its kept fractions")
    else:
        pairs = [(float(f), sub) for f, sub in masks.items()]
    if not pairs:
        raise ConfigError("compression_curve needs at least one kept fraction")
    rows = []
    for fraction, sub in sorted(pairs, key=lambda pair: -pair[0]):
        with apply_subnetwork(model, sub, "keep"):
            accuracy = float(metric(model))
        rows.append({"kept_fraction": fraction, "density": sub.density(), "kept": sub.kept(),
                     "accuracy": accuracy})
    return rows


# --------------------------------------------------------------------------- sparse files


def _state(model: nn.Module) -> dict[str, Tensor]:
    """The state dict with each tied tensor once, under its first name (as safetensors needs)."""
    out, seen = {}, set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) not in seen:
            seen.add(id(tensor))
            out[name] = tensor
    return out


def _pack(bits: Tensor) -> Tensor:
    """A flat bool tensor as uint8 bytes, eight entries each (least significant bit first)."""
    padded = torch.cat([bits, bits.new_zeros(-bits.numel() % 8)]).view(-1, 8).to(torch.uint8)
    return (padded << torch.arange(8, dtype=torch.uint8)).sum(1, dtype=torch.uint8)


def _unpack(packed: Tensor, numel: int) -> Tensor:
    return ((packed.unsqueeze(1) >> torch.arange(8, dtype=torch.uint8)) & 1).bool().view(-1)[
        :numel]


def sparse_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The tensors `save_sparse` writes: each state tensor with enough zeros as COO over its
    flattened form (`name.__coo_indices__` int32 row-major indices of the non-zeros,
    `...values__`, `...shape__`, and `...negzero__`, a bitmap of the -0.0 entries that masking
    leaves, so the restore is bit-exact), every other tensor dense under its own name. Tied
    tensors appear once; NaN counts as a value."""
    _require_plain(model, "sparse_state_dict")
    out = {}
    for name, tensor in _state(model).items():
        if name.endswith(_SUFFIXES):
            raise ConfigError(f"state entry {name!r} ends like instill's sparse-file keys")
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        keep = flat != 0
        negzero = (flat == 0) & torch.signbit(flat) if flat.is_floating_point() else None
        has_negzero = negzero is not None and bool(negzero.any())
        index_dtype = torch.int32 if flat.numel() < 2**31 else torch.int64
        sparse_bytes = (int(keep.sum()) * (index_dtype.itemsize + flat.element_size())
                        + 3 * _ENTRY_BYTES + (flat.numel() // 8 + 1) * has_negzero)
        if tensor.dim() >= 1 and sparse_bytes < flat.numel() * flat.element_size():
            out[name + INDICES] = keep.nonzero().squeeze(1).to(index_dtype)
            out[name + VALUES] = flat[keep].clone()
            out[name + SHAPE] = torch.tensor(tuple(tensor.shape), dtype=torch.int64)
            if has_negzero:
                out[name + NEGZERO] = _pack(negzero)
        else:
            out[name] = flat.view(tensor.shape).clone()
    return out


def _decode(tensors: dict[str, Tensor], path: Path) -> dict[str, Tensor]:
    """Dense tensors back from a sparse file's entries; damaged entries are FileFormatError."""
    out = {}
    for key, tensor in tensors.items():
        if key.endswith((VALUES, SHAPE, NEGZERO)):
            continue
        if not key.endswith(INDICES):
            out[key] = tensor
            continue
        name = key[: -len(INDICES)]
        values, shape = tensors.get(name + VALUES), tensors.get(name + SHAPE)
        if values is None or shape is None:
            raise FileFormatError(f"{path}: sparse entry {name!r} lacks its values or shape")
        numel = math.prod(shape.tolist())
        index = tensor.long()
        if (index.dim() != 1 or index.numel() != values.numel()
                or (index.numel() and (int(index.min()) < 0 or int(index.max()) >= numel))):
            raise FileFormatError(f"{path}: sparse entry {name!r} has damaged indices")
        dense = torch.zeros(numel, dtype=values.dtype)
        dense[index] = values
        negzero = tensors.get(name + NEGZERO)
        if negzero is not None:
            if negzero.dtype != torch.uint8 or negzero.numel() != -(-numel // 8):
                raise FileFormatError(f"{path}: sparse entry {name!r} has a damaged bitmap")
            dense[_unpack(negzero, numel)] = -0.0
        out[name] = dense.view(shape.tolist())
    for key in tensors:
        base = key.removesuffix(VALUES).removesuffix(SHAPE).removesuffix(NEGZERO)
        if key != base and base + INDICES not in tensors:
            raise FileFormatError(f"{path}: sparse entry {base!r} lacks its indices")
    return out


def save_sparse(path: str | Path, model: nn.Module) -> None:
    """Write a plain (baked) model's state to a safetensors file, zeros left out where that
    saves space; written atomically. Read it back with `load_sparse`."""
    save_tensors(path, sparse_state_dict(model), _META)


def load_sparse(path: str | Path, model: nn.Module) -> nn.Module:
    """Fill `model`'s parameters and buffers, in place and bit for bit, from a `save_sparse`
    file; never unpickles. Names, shapes and dtypes must match exactly. Returns `model`."""
    _require_plain(model, "load_sparse")
    path = Path(path)
    tensors, meta = load_tensors(path)
    if meta.get("format") != SPARSE_FORMAT:
        raise FileFormatError(f"{path} is a safetensors file but not an instill sparse weights "
                              f"file (no 'format: {SPARSE_FORMAT}' in its header)")
    if meta.get("version") != SPARSE_VERSION:
        raise FileFormatError(f"{path} is sparse weights format version {meta.get('version')}; "
                              f"this instill reads version {SPARSE_VERSION}")
    stored = _decode(tensors, path)
    state = _state(model)
    for name in list(state) + [n for n in stored if n not in state]:
        have, got = state.get(name), stored.get(name)
        if have is None or got is None or have.shape != got.shape or have.dtype != got.dtype:
            def show(t: Tensor | None) -> str:
                return "absent" if t is None else f"{tuple(t.shape)} {t.dtype}"
            raise SubnetworkMismatchError(
                f"{path} was saved from another architecture: {name!r} is {show(got)} in the "
                f"file and {show(have)} in {type(model).__name__}")
    with torch.no_grad():
        for name, tensor in state.items():
            tensor.copy_(stored[name])
    return model


def _file_bytes(tensors: dict[str, Tensor], meta: dict[str, str]) -> int:
    """Size of the file `save_tensors` writes for these tensors (written to a temp dir)."""
    with tempfile.TemporaryDirectory(prefix="instill-size-") as tmp:
        path = Path(tmp) / "sizes.safetensors"
        save_tensors(path, tensors, meta)
        return path.stat().st_size


def file_sizes(model: nn.Module, sparse_model: nn.Module | None = None) -> dict[str, Any]:
    """Bytes of `model` saved densely (safetensors) and of `sparse_model` (default: `model`)
    saved by `save_sparse`: what compression buys on disk."""
    _require_plain(model, "file_sizes")
    sparse = sparse_state_dict(model if sparse_model is None else sparse_model)
    return {"dense_bytes": _file_bytes(_state(model), {}),
            "sparse_bytes": _file_bytes(sparse, _META)}
