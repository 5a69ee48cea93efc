"""What the arithmetic and vision variants of `instill modules` share: one pipeline's
modularity analysis, the compression points and their rows, the union transplant and the
`bake` export. Task-agnostic: each variant passes its model, subnetworks and metrics."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from instill.analysis import (
    chance_overlap,
    cross_ablation,
    file_sizes,
    frivolous,
    magnitude_mask,
    overlap_matrix,
    pruned,
    save_sparse,
    torch_prune_reference,
)
from instill.checkpoint import load_model
from instill.core import Subnetwork, apply_subnetwork
from instill.core.targets import select_parameters
from instill.errors import ConfigError, FileFormatError, SubnetworkMismatchError
from instill.experiments.common import starting_model
from instill.experiments.framework import Experiment, once, read_json, unusable
from instill.experiments.modules_config import CompressionConfig
from instill.runio import load_config_file
from instill.training import DiscoveryConfig

Metric = Callable[[nn.Module], float]


class ModulesExperiment(Experiment):
    """The pipeline both variants share: one base model per attempt, its subnetworks and
    analyses, and the base subnetwork's pruned model as a sparse file. A variant defines
    `build()`, `_base(replicate, attempt, where)` (train, or copy from `from_run`),
    `source_units()`, `subnetworks(replicate, attempt, model)` and `analysis(...)`."""

    _sources: dict[tuple[int, int], tuple[nn.Module, dict[str, Subnetwork]]]

    def prepare(self) -> list[str]:
        """Fail on mask targets that match nothing, and on a bad `from_run`, before training."""
        mask = self.cfg.discovery.mask
        with torch.random.fork_rng(devices=[]):
            select_parameters(self.build(), mask.targets, mask.exclude, mask.mask_bias)
        if self.cfg.from_run:
            self.source_units()
        return []

    def pipelines(self) -> list[tuple[int]]:
        return [(r,) for r in range(self.cfg.replicates)]

    def pipeline_dir(self, unit: tuple) -> str:
        return f"pipelines/r{unit[0]}"

    def base_phase(self, replicate: int, attempt: int) -> dict[str, Any]:
        """Train (or copy from `from_run`) the base model of this attempt; its record."""
        where = self.attempt_dir((replicate,), attempt)
        once(self.run, [f"{where}/base.json", f"{where}/base.safetensors"],
             lambda: self._base(replicate, attempt, where))
        return read_json(self.run, f"{where}/base.json", "retrain it")

    def base_model(self, replicate: int, attempt: int) -> nn.Module:
        path = self.run.path(f"{self.attempt_dir((replicate,), attempt)}/base.safetensors")
        model = self.build()
        try:
            load_model(path, model)
        except (FileFormatError, SubnetworkMismatchError) as err:
            raise unusable(err, path, "retrain (or recopy) it") from None
        return model.eval()

    def complete(self, unit: tuple, attempt: int) -> dict[str, Any]:
        """The analyses, and the base subnetwork's pruned model as a sparse file (`bake`)."""
        record = self.analysis(unit[0], attempt)
        name = f"{self.attempt_dir(unit, attempt)}/pruned-base.safetensors"

        def bake() -> None:
            model, subs = self.source(unit[0], attempt)
            save_sparse(self.run.path(name), pruned(model, subs["base"]))

        once(self.run, [name], bake)
        return record

    def source(self, replicate: int, attempt: int) -> tuple[nn.Module, dict[str, Subnetwork]]:
        """The chosen attempt's base model and subnetworks, read once per process."""
        key = (replicate, attempt)
        if key not in self._sources:
            model = self.base_model(replicate, attempt)
            self._sources[key] = model, self.subnetworks(replicate, attempt, model)
        return self._sources[key]

    def bake(self, replicate: int, mask: str, out: str | Path) -> dict[str, Any]:
        """Export this finished run's base model of one replicate, pruned to `mask` (`base`, a
        subtask's name, or `magnitude:F` for a global magnitude mask keeping the fraction F),
        as a sparse safetensors file; its dense and sparse sizes."""
        attempt = chosen_attempt(self.run.root, replicate, self.cfg.replicates)
        model, subs = self.source(replicate, attempt)
        return bake_mask(model, subs, mask, self.cfg.discovery, out)


def union_model(trained: nn.Module, first: Subnetwork, second: Subnetwork,
                seed: int) -> nn.Module:
    """The union of two subnetworks transplanted (frozen) into a fresh model (Subtask Induction
    of both at once)."""
    return starting_model("subnet", trained, first | second, seed, freeze=True)


def kept_score(model: nn.Module, sub: Subnetwork, metric: Metric) -> float:
    """`metric` of `model` with only `sub`'s weights kept."""
    with apply_subnetwork(model, sub, "keep"):
        return metric(model)


def _ablated_score(model: nn.Module, sub: Subnetwork, metric: Metric) -> float:
    with apply_subnetwork(model, sub, "ablate"):
        return metric(model)


def modularity(model: nn.Module, subs: Mapping[str, Subnetwork], subtasks: list[str],
               metrics: Mapping[str, Metric], seed: int) -> dict[str, Any]:
    """One pipeline's analyses (`analysis.json`): each subnetwork alone on its own task,
    overlap and its chance level, cross-ablation against same-size random ablation, and the
    frivolous weights. `subs` and `metrics` hold every subtask and `base`."""
    alone = {n: kept_score(model, sub, metrics[n]) for n, sub in subs.items()}

    # Subtask j is read from subnetwork j alone (the base model need not output subtask j):
    # entry (i, j) is subnetwork j's subtask accuracy with i's weights removed.
    def within(j: str) -> Metric:
        return lambda m: kept_score(m, subs[j], metrics[j])

    reads = {**{j: within(j) for j in subtasks}, "base": metrics["base"]}
    task_subs = {n: subs[n] for n in subtasks}
    unused = frivolous(task_subs, base=subs["base"])
    control = unused.sample_like(torch.Generator().manual_seed(seed))
    names = list(subs)
    return {
        "alone": alone, "full": {n: f(model) for n, f in metrics.items()},
        "density": {n: s.density() for n, s in subs.items()},
        "per_layer_density": {n: s.per_layer_density() for n, s in subs.items()},
        "overlap": overlap_matrix(subs),
        "chance": {i: {j: chance_overlap(subs[i], subs[j]) for j in names} for i in names},
        "cross_ablation": cross_ablation(model, task_subs, reads, seed),
        "frivolous": {"fraction": unused.density(), "kept": unused.kept(),
                      "base_accuracy_full": metrics["base"](model),
                      "base_accuracy_removed": _ablated_score(model, unused, metrics["base"]),
                      "base_accuracy_random_removed": _ablated_score(model, control,
                                                                     metrics["base"])}}


def compression_points(cfg: CompressionConfig) -> list[tuple[str, float]]:
    """The (method, setting) of every compression cell: all magnitude fractions in one, then
    each lambda, top-k fraction and the hard-concrete lambda."""
    points = [("magnitude", 0.0), *(("continuous", lam) for lam in cfg.lambdas),
              *(("top_k", f) for f in cfg.top_k)]
    if cfg.hard_concrete_lambda is not None:
        points.append(("hard_concrete", cfg.hard_concrete_lambda))
    return points


def compression_rows(model: nn.Module, method: str, param: float, metric: Metric,
                     discovery: DiscoveryConfig, cfg: CompressionConfig,
                     train_mask: Callable[[DiscoveryConfig], Subnetwork]) -> list[dict[str, Any]]:
    """One compression cell's rows: base-task `metric` with only the kept weights, the kept
    fraction and the dense and sparse file sizes. `magnitude` gives global magnitude masks and
    torch's pruning at every `cfg.fractions`; a trained method calls `train_mask` with the
    discovery settings changed to it."""
    mask = discovery.mask
    masks: list[tuple[str, float, Subnetwork]] = []
    if method == "magnitude":
        names = list(select_parameters(model, mask.targets, mask.exclude, mask.mask_bias))
        for f in [1.0, *cfg.fractions]:
            masks.append(("magnitude", f, magnitude_mask(
                model, f, scope="global", targets=mask.targets, exclude=mask.exclude,
                mask_bias=mask.mask_bias)))
            masks.append(("torch_prune", f, torch_prune_reference(model, f, names)))
    else:
        overrides = {"continuous": {"l0_lambda": param},
                     "hard_concrete": {"method": "hard_concrete", "l0_lambda": param},
                     "top_k": {"method": "top_k", "keep": param, "scope": "layer"}}[method]
        masks.append((method, param, train_mask(dataclasses.replace(
            discovery, mask=dataclasses.replace(mask, **overrides)))))
    return [{"kind": "compression", "method": name, "param": value, "density": sub.density(),
             "kept": sub.kept(), "accuracy": kept_score(model, sub, metric),
             **file_sizes(model, pruned(model, sub))} for name, value, sub in masks]


def recorded_config(run_dir: str | Path, what: str) -> dict[str, Any]:
    """The config a run directory recorded; a clear error when it is not a run of `what`."""
    root = Path(run_dir)
    if not (root / "config.json").is_file():
        raise ConfigError(f"{root} has no config.json; pass the --out of an `{what}` run")
    return load_config_file(root / "config.json").get("config", {})


def chosen_attempt(root: Path, replicate: int, replicates: int) -> int:
    """The attempt a finished pipeline of a modules run chose."""
    attempts = root / f"pipelines/r{replicate}/attempts.json"
    if not attempts.is_file():
        raise ConfigError(f"{root} has no finished pipeline r{replicate}; choose a replicate "
                          f"below {replicates}")
    return load_config_file(attempts)["attempt"]


def bake_mask(model: nn.Module, subs: Mapping[str, Subnetwork], mask: str,
              discovery: DiscoveryConfig, out: str | Path) -> dict[str, Any]:
    """Write `model` pruned to `mask` (a subnetwork's name, or `magnitude:F`: a global
    magnitude mask keeping the fraction F) as a sparse safetensors file; its sizes."""
    targets = discovery.mask
    if mask.startswith("magnitude:"):
        try:
            sub = magnitude_mask(model, float(mask.split(":", 1)[1]), scope="global",
                                 targets=targets.targets, exclude=targets.exclude)
        except ValueError:
            raise ConfigError(f"--mask {mask!r}: write magnitude:F with F in (0, 1]") from None
    elif mask in subs:
        sub = subs[mask]
    else:
        raise ConfigError(f"--mask {mask!r} is none of {list(subs)} or magnitude:F")
    baked = pruned(model, sub)
    save_sparse(out, baked)
    return {**file_sizes(model, baked), "density": sub.density()}
