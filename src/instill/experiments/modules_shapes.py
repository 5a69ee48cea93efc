"""Several subtasks in one vision model (`instill modules --task shapes`): a shape and a texture
subnetwork of the shape-bias experiment's ResNet.

For each of `replicates` pipelines: train (or reuse, `from_run`, a shapebias run's) a ResNet on
`natural` images of the generated shape world, where texture is the easy shortcut; discover a
`shape` subnetwork on `shape_only` images, a `texture` subnetwork on `texture_only` images
(shuffled patches: texture kept, silhouette destroyed) and one for the base task on `natural`
images, all with the same settings; then measure overlap against chance, cross-ablation and
frivolous weights (`modules_common.modularity`). Gates: the base model learnt the natural task,
is texture-biased, and each subnetwork alone computes its subtask. Cells: union induction (the
union of shape and texture subnetworks transplanted, against each alone and random init, trained
on natural images; shape bias and accuracy) and compression points on the base task.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from instill.checkpoint import save_model
from instill.core import Subnetwork
from instill.errors import ConfigError, FileFormatError, SubnetworkMismatchError
from instill.experiments.common import starting_model
from instill.experiments.executors import Executor, LocalExecutor
from instill.experiments.framework import Cell, once, read_json, unusable
from instill.experiments.modules_common import (
    ModulesExperiment,
    compression_points,
    compression_rows,
    modularity,
    union_model,
)
from instill.experiments.modules_config import (
    SHAPES_MODEL_KEYS,
    SHAPES_SUBTASKS,
    SHAPES_UNION_CONDITIONS,
    ShapesModulesConfig,
)
from instill.experiments.modules_shapes_report import write_report
from instill.experiments.pipeline import Gate, failed
from instill.runio import load_config_file, to_dict
from instill.seeds import derive_seed
from instill.storage import atomic_write_bytes, write_json
from instill.tasks.images import ImageSet
from instill.tasks.shape_task import AugmentConfig, ImageTask
from instill.tasks.shapes import make_split
from instill.training import DiscoveryConfig, FitConfig, discover, fit

#: The split each subnetwork is discovered on and evaluated on (the base task: natural).
SPLITS = {**SHAPES_SUBTASKS, "base": "natural"}


@dataclass
class ShapesData:
    """The generated image sets every pipeline shares: per split a discovery set and a held-out
    evaluation set, the natural base-training and validation sets, cue-conflict images."""

    base_train: ImageSet
    val: ImageSet
    train: dict[str, ImageSet]  # subnetwork name -> its discovery images
    held_out: dict[str, ImageSet]  # subnetwork name -> its held-out images
    cue_conflict: ImageSet


def make_data(cfg: ShapesModulesConfig) -> ShapesData:
    """Generate every shared image set from the config's world and seed."""
    def gen(split: str, n: int, kind: str) -> ImageSet:
        return make_split(cfg.world, split, n, derive_seed(cfg.seed, "data", kind))

    return ShapesData(
        base_train=gen("natural", cfg.base_samples, "base_train"),
        val=gen("natural", cfg.n_val, "val"),
        train={n: gen(s, cfg.discovery_samples, f"{n}_train") for n, s in SPLITS.items()},
        held_out={n: gen(s, cfg.eval_samples, f"{n}_eval") for n, s in SPLITS.items()},
        cue_conflict=gen("cue_conflict", cfg.eval_samples, "cue_conflict"))


class ModulesShapesRun(ModulesExperiment):
    """One run directory: `pipelines/r{r}/a{i}/` holds a base model, `sub-shape`, `sub-texture`
    and `sub-base.safetensors` and `analysis.json`; `cells/` the union and compression records."""

    name = "modules-shapes"
    config_class = ShapesModulesConfig

    def __init__(self, cfg: ShapesModulesConfig, out: str | Path, log=print,
                 **options: Any) -> None:
        super().__init__(cfg, out, log, **options)
        if self.device.type != "cpu":
            raise ConfigError(f"instill modules runs on the CPU only so far (got --device "
                              f"{self.device}); drop --device")
        self.task = ImageTask(AugmentConfig())
        self.names = [*cfg.subtasks, "base"]
        self._data: ShapesData | None = None
        self._sources: dict[tuple[int, int], tuple[nn.Module, dict[str, Subnetwork]]] = {}

    @property
    def data(self) -> ShapesData:
        if self._data is None:
            self._data = make_data(self.cfg)
        return self._data

    def build(self) -> nn.Module:
        return self.cfg.resnet.build(self.cfg.classes)

    def metrics(self) -> dict[str, Any]:
        """Accuracy on each subnetwork's held-out split (shape_only, texture_only, natural)."""
        return {n: (lambda m, d=d: self.task.accuracy(m, d)) for n, d in self.data.held_out.items()}

    def evaluate(self, model: nn.Module) -> dict[str, Any]:
        """Held-out accuracy on every split and shape bias on cue-conflict images."""
        bias = self.task.shape_bias(model, self.data.cue_conflict)
        return {**{f"{SPLITS[n]}_accuracy": f(model) for n, f in self.metrics().items()},
                "shape_bias": bias["shape_bias"], "shape_hits": bias["shape_hits"],
                "texture_hits": bias["texture_hits"]}

    # -- base model: trained here or reused -------------------------------------------------
    def source_units(self) -> list[Path]:
        """The reused shapebias run's chosen base attempt per replicate; a clear error unless it
        trained a ResNet of the same size on the same generated world, with enough replicates."""
        root = Path(self.cfg.from_run or "")
        if not (root / "config.json").is_file():
            raise ConfigError(f"--from {root}: no config.json there; pass the directory of an "
                              "`instill shapebias` run (the --out it was given)")
        recorded = load_config_file(root / "config.json").get("config", {})
        if recorded.get("arch") != "resnet":
            raise ConfigError(f"--from {root}: its arch is {recorded.get('arch')!r}, but the "
                              "vision modules experiment needs a ResNet; pass an `instill "
                              "shapebias --arch resnet` run, or train the base here (no --from)")
        for key in ("train_dir", "shape_dir", "cue_conflict_dir"):
            if recorded.get(key):
                raise ConfigError(f"--from {root}: its {key} is {recorded[key]!r}, but this "
                                  "experiment uses the generated shape world; pass a run made "
                                  "without image folders, or train the base here (no --from)")
        mine = to_dict(self.cfg)
        for key in SHAPES_MODEL_KEYS:
            if recorded.get(key) != mine[key]:
                raise ConfigError(f"--from {root}: its {key} is {recorded.get(key)!r} but this "
                                  f"run needs {mine[key]!r}; pass --set {key}=... to match that "
                                  "run, or train the base here (no --from)")
        paths = []
        for r in range(self.cfg.replicates):
            unit = root / f"pipelines/r{r}"
            if not (unit / "attempts.json").is_file():
                raise ConfigError(f"--from {root}: no finished pipeline {unit.name} (it has "
                                  "fewer replicates); lower --replicates")
            paths.append(unit / f"a{load_config_file(unit / 'attempts.json')['attempt']}")
        return paths

    def _base(self, replicate: int, attempt: int, where: str) -> None:
        path = self.run.path(f"{where}/base.safetensors")
        if self.cfg.from_run:
            source = self.source_units()[replicate]
            atomic_write_bytes(path, (source / "base.safetensors").read_bytes())
            info: dict[str, Any] = {"source": str(source)}
        else:
            seed = self.seed("base", replicate, attempt)
            torch.manual_seed(seed)
            model = self.build()
            result = fit(model, _tensors(self.data.base_train), self.task.loss,
                         self.cfg.base_fit, seed=seed,
                         evaluate=lambda m: self.task.accuracy(m, self.data.val),
                         desc=f"base r{replicate}")
            save_model(path, model, {"arch": "resnet"})
            info = {"seed": seed, "val_accuracy": result.best_score,
                    "best_epoch": result.best_epoch}
        info = {"replicate": replicate, "attempt": attempt, **info,
                **self.evaluate(self.base_model(replicate, attempt))}
        write_json(self.run.path(f"{where}/base.json"), info)
        self.log(f"base r{replicate} a{attempt}: natural accuracy "
                 f"{info['natural_accuracy']:.3f}, shape bias {info['shape_bias']}")

    # -- subnetworks, analyses, gates ---------------------------------------------------------
    def sub_file(self, where: str, name: str) -> str:
        return f"{where}/sub-{name}.safetensors"

    def subnetworks(self, replicate: int, attempt: int, model: nn.Module
                    ) -> dict[str, Subnetwork]:
        """The shape, texture and base subnetworks, same discovery settings for each."""
        where, out = self.attempt_dir((replicate,), attempt), {}
        for k, name in enumerate(self.names):
            file = self.sub_file(where, name)

            def compute(name: str = name, k: int = k, file: str = file) -> None:
                seed = self.seed("discovery", replicate, attempt, k)
                torch.manual_seed(seed)
                sub, _ = discover(model, _tensors(self.data.train[name]), self.task.loss,
                                  self.cfg.discovery, seed=seed,
                                  desc=f"discover {name} r{replicate}")
                Subnetwork(sub.masks, sub.fingerprint,
                           {**sub.metadata, "subtask": name, "split": SPLITS[name]}
                           ).save(self.run.path(file))

            once(self.run, [file], compute)
            try:
                out[name] = Subnetwork.load(self.run.path(file))
                out[name].check_model(model)
            except (FileFormatError, SubnetworkMismatchError) as err:
                raise unusable(err, self.run.path(file), "rediscover it") from None
        return out

    def analysis(self, replicate: int, attempt: int) -> dict[str, Any]:
        """Overlap (and chance), cross-ablation (and random control), frivolous weights."""
        name = f"{self.attempt_dir((replicate,), attempt)}/analysis.json"

        def compute() -> None:
            model = self.base_model(replicate, attempt)
            subs = self.subnetworks(replicate, attempt, model)
            write_json(self.run.path(name), modularity(
                model, subs, self.cfg.subtasks, self.metrics(),
                self.seed("ablation", replicate)))

        once(self.run, [name], compute)
        return read_json(self.run, name, "recompute it")

    def attempt(self, unit: tuple, attempt: int) -> list[Gate]:
        (replicate,), gates = unit, self.cfg.gates
        base = self.base_phase(replicate, attempt)
        bias = base["shape_bias"]
        retrain = " (with --from the same model is reused: train the base here instead)"
        checks = [
            Gate("base natural accuracy", base["natural_accuracy"], gates.natural_accuracy,
                 "the base model did not learn its task: train longer (base_fit.epochs), on "
                 "more images (base_samples) or with another lr" + retrain),
            Gate("base texture bias", 0.0 if bias is None else 1 - bias, gates.texture_bias,
                 "the base model is not texture-biased on cue-conflict images: raise rho or "
                 "lower gates.texture_bias" + retrain)]
        if failed(checks):
            return checks
        alone = self.complete(unit, attempt)["alone"]
        return [*checks, *(Gate(f"`{n}` subnetwork alone", alone[n], gates.subnetwork_accuracy,
                                f"discovery did not find a {n} subnetwork on {SPLITS[n]} "
                                "images: train the masks longer (discovery.epochs), on more "
                                "images (discovery_samples) or with another lr")
                           for n in self.cfg.subtasks)]

    # -- cells --------------------------------------------------------------------------------
    def epochs_for(self, n: int) -> int:
        """Induction epochs for n images: at least `union.induction_min_examples` examples."""
        u = self.cfg.union
        return max(u.induction_fit.epochs, math.ceil(u.induction_min_examples / n))

    def cells(self, chosen: dict[tuple, dict[str, Any]]) -> list[Cell]:
        out, c = [], self.cfg
        for (r,), record in chosen.items():
            i = record["attempt"]
            where = self.attempt_dir((r,), i)
            inputs = (f"{where}/base.safetensors", *(self.sub_file(where, n) for n in self.names))
            if c.union.enabled:
                out += [Cell(f"r{r}-a{i}-union-n{n}", ("union", r, i, 0.0, n), inputs,
                             cost=4 * self.epochs_for(n) * (3 * n + c.n_val))
                        for n in c.union.grid]
            cost = 3 * c.discovery.epochs * c.compression.samples
            out += [Cell(f"r{r}-a{i}-{m}-{p:g}", (m, r, i, p, 0), inputs, cost=cost)
                    for m, p in compression_points(c.compression)]
        return out

    def cell(self, kind: str, replicate: int, attempt: int, param: float, n: int
             ) -> dict[str, Any]:
        if kind == "union":
            return {"rows": self._union(replicate, attempt, n)}
        return {"rows": self._compress(kind, replicate, attempt, param)}

    def _union(self, replicate: int, attempt: int, n: int) -> list[dict[str, Any]]:
        """Every union condition trained on the same first n natural images of this pipeline's
        pool (the shapebias induction phase); accuracy on every split and shape bias."""
        trained, subs = self.source(replicate, attempt)
        pool = make_split(self.cfg.world, "natural", max(self.cfg.union.grid),
                          derive_seed(self.cfg.seed, "data", "pool", replicate))
        train = _tensors(pool.subset(range(n)))
        fit_cfg = FitConfig(**{**to_dict(self.cfg.union.induction_fit),
                               "epochs": self.epochs_for(n)})
        seed, rows = self.seed("union", replicate, n), []
        for condition in SHAPES_UNION_CONDITIONS:
            torch.manual_seed(seed)
            model = {"union": lambda: union_model(trained, subs["shape"], subs["texture"], seed),
                     "shape": lambda: starting_model("subnet", trained, subs["shape"], seed),
                     "texture": lambda: starting_model("subnet", trained, subs["texture"], seed),
                     "random": lambda: starting_model("random", trained, subs["shape"], seed)
                     }[condition]()
            result = fit(model, train, self.task.loss, fit_cfg, seed=seed,
                         evaluate=lambda m: self.task.accuracy(m, self.data.val),
                         desc=f"{condition} r{replicate} n={n}")
            rows.append({"kind": "union", "replicate": replicate, "condition": condition,
                         "n": n, **self.evaluate(model), "val_accuracy": result.best_score,
                         "epochs": fit_cfg.epochs})
        return rows

    def _compress(self, method: str, replicate: int, attempt: int, param: float
                  ) -> list[dict[str, Any]]:
        model, _ = self.source(replicate, attempt)

        def train_mask(cfg: DiscoveryConfig) -> Subnetwork:
            seed = self.seed("compress", replicate, method, repr(param))
            torch.manual_seed(seed)
            data = make_split(self.cfg.world, "natural", self.cfg.compression.samples,
                              derive_seed(self.cfg.seed, "data", "compress", replicate))
            return discover(model, _tensors(data), self.task.loss, cfg, seed=seed,
                            desc=f"{method} {param:g} r{replicate}")[0]

        rows = compression_rows(model, method, param, self.metrics()["base"],
                                self.cfg.discovery, self.cfg.compression, train_mask)
        return [{**row, "replicate": replicate} for row in rows]

    def report(self, chosen: dict[tuple, dict[str, Any]], cells: list[Cell],
               records: list[dict[str, Any]]) -> dict[str, Any]:
        rows = [row for record in records for row in record["rows"]]
        dirs = {f"r{r}": self.attempt_dir((r,), c["attempt"]) for (r,), c in chosen.items()}
        analyses = {u: read_json(self.run, f"{d}/analysis.json") for u, d in dirs.items()}
        bases = {u: read_json(self.run, f"{d}/base.json") for u, d in dirs.items()}
        return write_report(self.run, to_dict(self.cfg), to_dict(ShapesModulesConfig()), rows,
                            analyses, bases, {f"r{r}": c for (r,), c in chosen.items()},
                            self.warnings)


def _tensors(data: ImageSet) -> list[Tensor]:
    return [data.images, data.labels]



def run_modules_shapes(cfg: ShapesModulesConfig, out: str | Path, log=print, threads: int = 1,
                       workers: int = 1, device: str = "cpu",
                       executor: Executor | None = None) -> dict[str, Any]:
    """Run the whole vision experiment into `out`; returns the summary."""
    torch.set_num_threads(threads)
    return ModulesShapesRun(cfg, out, log, threads=threads, device=device,
                            executor=executor or LocalExecutor(workers)).execute()


__all__ = ["SPLITS", "ModulesShapesRun", "ShapesData", "make_data",
           "run_modules_shapes"]
