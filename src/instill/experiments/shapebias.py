"""Experiment B of the paper: instilling a shape bias in an image classifier.

The generated ShapeWorld (`instill.tasks.shapes`) stands in for ImageNet: on `natural` images the
label is the object's shape and the texture agrees with probability `rho`, so texture is an easy
shortcut and a model trained there becomes texture-biased. Phases (each skipped when its output
exists, so an interrupted run resumes), for each of `replicates` independent pipelines:

1. train the base model (HF ResNet or ViT) on `natural` images; measure its shape bias;
2. discover the shape subnetwork on `shape_only` images (the "mean-pooled ImageNet" analogue),
   verify it and check the gates (a failed gate retries the pipeline with the next seed); with
   `random_subnet` in the conditions, also discover one with the same settings in a randomly
   initialized model (is the trained model needed?);
3. induction: cells of replicate x downstream size n x seed, every condition trained on the same
   `natural` images: the shared conditions (`common.starting_model`), random_aug (random init
   trained with a shape-preserving, texture-destroying augmentation) and random_subnet (the
   random-init subnetwork transplanted like `subnet`);
4. evaluate each model: accuracy on held-out natural and shape_only images, shape bias on
   cue-conflict images;
5. report with intervals over replicates (`shapebias_report`).

Real image folders (`train_dir`, `shape_dir`, `cue_conflict_dir`) replace the generated splits.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from instill.checkpoint import load_model, save_model
from instill.core import Subnetwork, fresh_init, transplant
from instill.errors import InstillError
from instill.experiments.common import starting_model, verify_subnetwork
from instill.experiments.executors import Executor, LocalExecutor
from instill.experiments.framework import Cell, Experiment, once, read_json
from instill.experiments.pipeline import Gate, failed
from instill.experiments.shapebias_config import (
    ALL_SHAPE_CONDITIONS,
    ARCHS,
    PRESETS,
    SHAPE_CONDITIONS,
    ShapeBiasConfig,
    ShapeBiasGates,
    load_config,
)
from instill.experiments.shapebias_data import ShapeBiasData, check_dirs, load_data
from instill.experiments.shapebias_report import write_report
from instill.models import build_model
from instill.runio import to_dict
from instill.storage import write_json
from instill.tasks.images import ImageSet
from instill.tasks.shape_task import AugmentConfig, ImageTask
from instill.training import FitConfig, discover, fit

LossFn = Callable[[nn.Module, Sequence[Tensor]], Tensor]


def capped_complement(sub: Subnetwork, generator: torch.Generator) -> tuple[Subnetwork, str]:
    """`sub.sample_complement`, except that a layer where the subnetwork keeps more than half
    gets every weight outside it (fewer than the subnetwork keeps there). Returns the mask and
    a note naming the capped layers."""
    masks, capped = {}, []
    for name, mask in sub.masks.items():
        free = (~mask).flatten().nonzero().squeeze(1)
        k = int(mask.sum())
        if free.numel() < k:
            capped.append(f"{name} {free.numel()} of {k}")
        chosen = free[torch.randperm(free.numel(), generator=generator)[:k]]
        out = torch.zeros(mask.numel(), dtype=torch.bool)
        out[chosen] = True
        masks[name] = out.view(mask.shape)
    kept = sum(int(m.sum()) for m in masks.values())
    note = (f"capped layers: {'; '.join(capped)}; complement density "
            f"{kept / max(sub.total(), 1):.4f} vs subnetwork {sub.density():.4f}")
    return Subnetwork(masks, sub.fingerprint, dict(sub.metadata)), note


# -- phases -----------------------------------------------------------------------------------
class ShapeBiasRun(Experiment):
    """One run directory of the experiment, on the shared seam (`framework.Experiment`).

    Layout: `pipelines/r{r}/a{i}/` holds attempt i of replicate r (its base model, subnetwork,
    verification and, with `random_subnet`, the random-init control; `attempts.json` beside it
    records every attempt's gates), and `cells/r{r}-a{i}-n{n}-s{s}.json` the induction cells of the
    chosen attempt.
    """

    name = "shapebias"
    config_class = ShapeBiasConfig

    def __init__(self, cfg: ShapeBiasConfig, out: str | Path, log=print, **options: Any) -> None:
        check_dirs(cfg)  # before the output directory is made
        super().__init__(cfg, out, log, **options)
        self.task = ImageTask(cfg.augment)
        self._data: ShapeBiasData | None = None

    @property
    def data(self) -> ShapeBiasData:
        if self._data is None:
            self._data = load_data(self.cfg)
        return self._data

    def tensors(self, data: ImageSet) -> list[Tensor]:
        return [data.images.to(self.device), data.labels.to(self.device)]

    def build(self) -> nn.Module:
        cfg, k = self.cfg, len(self.data.class_names)
        if cfg.arch == "vit":
            spec = cfg.vit
            model = build_model("vit", num_labels=k, image_size=cfg.size,
                                patch_size=spec.patch_size, hidden_size=spec.hidden_size,
                                num_hidden_layers=spec.num_hidden_layers,
                                num_attention_heads=spec.num_attention_heads,
                                intermediate_size=spec.intermediate_size, dropout=spec.dropout)
        else:
            spec = cfg.resnet
            model = build_model("resnet", num_labels=k, embedding_size=spec.embedding_size,
                                hidden_sizes=tuple(spec.hidden_sizes), depths=tuple(spec.depths),
                                layer_type=spec.layer_type)
        return model.to(self.device)

    def load(self, name: str) -> nn.Module:
        """A model saved in the run directory."""
        model = self.build()
        load_model(self.run.path(name), model)
        return model.eval()

    def evaluate(self, model: nn.Module) -> dict[str, Any]:
        """Held-out natural accuracy, shape_only accuracy, shape bias on cue-conflict images."""
        bias = self.task.shape_bias(model, self.data.cue_conflict)
        return {"natural_accuracy": self.task.accuracy(model, self.data.test),
                "shape_only_accuracy": self.task.accuracy(model, self.data.shape_eval),
                "shape_bias": bias["shape_bias"], "shape_hits": bias["shape_hits"],
                "texture_hits": bias["texture_hits"], "other": bias["other"],
                "cue_conflict_n": bias["n"]}

    @property
    def kinds(self) -> tuple[str, ...]:
        """The models a pipeline discovers a subnetwork in: the trained base model, and a
        random-init one for the `random_subnet` control."""
        return ("trained", "random_init") if "random_subnet" in self.cfg.conditions \
            else ("trained",)

    def pipelines(self) -> list[tuple[int]]:
        return [(r,) for r in range(self.cfg.replicates)]

    def pipeline_dir(self, unit: tuple) -> str:
        return f"pipelines/r{unit[0]}"

    # -- one attempt of one pipeline: base model, subnetwork, verification, gates --------------
    def base_phase(self, replicate: int, attempt: int) -> dict[str, Any]:
        """Phase 1: train the base model of this attempt on natural images unless its files
        exist; its record."""
        where = _attempt_dir(replicate, attempt)
        once(self.run, [f"{where}/base.json", f"{where}/base.safetensors"],
             lambda: self._train_base(replicate, attempt, where))
        return read_json(self.run, f"{where}/base.json", "retrain it")

    def _train_base(self, replicate: int, attempt: int, where: str) -> None:
        seed = self.seed("base", replicate, attempt)
        torch.manual_seed(seed)
        model = self.build()
        val = self.data.base_val
        start = time.perf_counter()
        result = fit(model, self.tensors(self.data.base_train), self.task.loss, self.cfg.base_fit,
                     seed=seed, evaluate=lambda m: self.task.accuracy(m, val),
                     desc=f"base r{replicate}")
        info = {"arch": self.cfg.arch, "replicate": replicate, "attempt": attempt, "seed": seed,
                "val_accuracy": result.best_score, "best_epoch": result.best_epoch,
                "seconds": time.perf_counter() - start,
                "parameters": sum(p.numel() for p in model.parameters()),
                **self.evaluate(model), "history": result.history}
        save_model(self.run.path(f"{where}/base.safetensors"), model, {"arch": self.cfg.arch})
        write_json(self.run.path(f"{where}/base.json"), info)
        self.log(f"base r{replicate} a{attempt}: natural accuracy {info['natural_accuracy']:.3f}, "
                 f"shape_only {info['shape_only_accuracy']:.3f}, shape bias "
                 f"{_fmt(info['shape_bias'])} (epoch {result.best_epoch})")

    def model(self, replicate: int, attempt: int, kind: str) -> nn.Module:
        """The `trained` base model, or the `random_init` one of the same architecture (drawn
        and saved the first time it is asked for)."""
        name = f"{_attempt_dir(replicate, attempt)}/{'base' if kind == 'trained' else kind}" \
               ".safetensors"
        if kind == "random_init":
            once(self.run, [name], lambda: save_model(
                self.run.path(name), fresh_init(self.model(replicate, attempt, "trained"),
                                                self.seed("random_init", replicate, attempt)),
                {"arch": self.cfg.arch, "note": "random init"}))
        return self.load(name)

    def subnetwork(self, replicate: int, attempt: int, kind: str, model: nn.Module) -> Subnetwork:
        """Phase 2: discover (or load) the shape subnetwork of the `trained` or `random_init`
        model on shape_only images (the same settings and seed for both)."""
        name = f"{_attempt_dir(replicate, attempt)}/{_prefix(kind)}subnetwork.safetensors"
        path = self.run.path(name)

        def compute() -> None:
            seed, start = self.seed("discovery", replicate, attempt), time.perf_counter()
            sub, history = discover(model, self.tensors(self.data.shape_train), self.task.loss,
                                    self.cfg.discovery, seed=seed,
                                    desc=f"discover {kind} r{replicate}")
            write_json(path.with_suffix(".json"),
                       {"history": history, "seconds": time.perf_counter() - start})
            Subnetwork(sub.masks, sub.fingerprint,
                       {**sub.metadata, "subtask": "shape_only", "source": kind,
                        "arch": self.cfg.arch}).save(path)
            self.log(f"subnetwork ({kind}) r{replicate} a{attempt}: density "
                     f"{sub.density():.4f} ({sub.kept()} weights)")

        once(self.run, [name], compute)
        # Read it back even when just written: the file's mask order (which seeded random
        # controls consume) is then the same in this run and in a resumed one.
        sub = Subnetwork.load(path)
        sub.check_model(model)
        return sub

    def verify(self, replicate: int, attempt: int, kind: str, model: nn.Module,
               sub: Subnetwork) -> dict[str, Any]:
        """The subnetwork alone, ablated, and a same-size random ablation."""
        name = f"{_attempt_dir(replicate, attempt)}/{_prefix(kind)}verify.json"
        metrics = {
            "shape_only": lambda m: self.task.accuracy(m, self.data.shape_eval),
            "natural": lambda m: self.task.accuracy(m, self.data.test),
            "shape_bias": lambda m: self.task.shape_bias(m, self.data.cue_conflict)["shape_bias"],
        }
        once(self.run, [name], lambda: write_json(self.run.path(name), verify_subnetwork(
            model, sub, metrics, self.seed("verify", replicate, attempt))))
        return read_json(self.run, name)

    def attempt(self, unit: tuple, attempt: int) -> list[Gate]:
        """One attempt of a pipeline, up to the first gate it fails."""
        (replicate,), gates = unit, self.cfg.gates
        base = self.base_phase(replicate, attempt)
        bias = base["shape_bias"]
        checks = [
            Gate("base natural accuracy", base["natural_accuracy"], gates.natural_accuracy,
                 "the base model did not learn its task on held-out natural images: train "
                 "longer (base_fit.epochs), on more images (base_samples) or with another lr"),
            Gate("base texture bias", 0.0 if bias is None else 1 - bias, gates.texture_bias,
                 "the base model is not texture-biased on cue-conflict images (1 - shape bias; "
                 "0 when no prediction matched either cue), so there is no shape bias to "
                 "instill: raise rho (texture a better shortcut) or lower gates.texture_bias")]
        if failed(checks):
            return checks
        model = self.model(replicate, attempt, "trained")
        sub = self.subnetwork(replicate, attempt, "trained", model)
        acc = self.verify(replicate, attempt, "trained", model, sub)["accuracy"]
        alone = acc["subnetwork only"]["shape_only"]
        margin = (acc["random same-size ablated"]["shape_only"]
                  - acc["subnetwork ablated"]["shape_only"])
        fix = ("discovery did not find a shape subnetwork: train the masks longer "
               "(discovery.epochs), with another lr or l0_lambda, or on more shape_only images "
               "(discovery_samples)")
        return [*checks,
                Gate("subnetwork alone on shape_only", alone, gates.subnetwork_accuracy, fix),
                Gate("ablation specificity", margin, gates.ablation_margin, fix)]

    def complete(self, unit: tuple, attempt: int) -> None:
        """What the cells need of the chosen attempt: its subnetwork and verification (not yet
        there when gates are overridden after an early failure) and the random-init control."""
        for kind in self.kinds:
            model = self.model(unit[0], attempt, kind)
            self.verify(unit[0], attempt, kind, model,
                        self.subnetwork(unit[0], attempt, kind, model))

    # -- induction ------------------------------------------------------------------------------
    def start(self, condition: str, replicate: int, attempt: int, trained: nn.Module,
              sub: Subnetwork, seed: int) -> tuple[nn.Module, LossFn, str | None]:
        """A condition's starting model and loss, and a note when its mask had to be capped."""
        freeze, loss = self.cfg.freeze, self.task.loss
        if condition == "random_aug":
            model = starting_model("random", trained, sub, seed)
            return model, self.task.augmented_loss(seed), None
        if condition == "random_subnet":
            random = self.model(replicate, attempt, "random_init")
            random_sub = self.subnetwork(replicate, attempt, "random_init", random)
            return starting_model("subnet", random, random_sub, seed, freeze=freeze), loss, None
        try:
            return starting_model(condition, trained, sub, seed, freeze=freeze), loss, None
        except InstillError as err:
            if not condition.startswith("complement"):
                raise
            # More than half of some layer is in the subnetwork: no same-size complement.
            capped, note = capped_complement(sub, torch.Generator().manual_seed(seed))
            self.log(f"note: {err}; the complement keeps every weight outside the subnetwork "
                     f"there ({note})")
            model = transplant(trained, capped, freeze=freeze,
                               keep_unmasked=condition == "complement", seed=seed)
            return model, loss, note

    def cell(self, replicate: int, attempt: int, n: int, seed: int) -> dict[str, Any]:
        """Phase 3 unit of work: every condition trained on the same n natural images; its rows
        and notes."""
        trained = self.model(replicate, attempt, "trained")
        sub = self.subnetwork(replicate, attempt, "trained", trained)
        train = self.tensors(self.data.pool(replicate, seed).subset(range(n)))
        val = self.data.val
        run_seed = self.seed("cell", replicate, n, seed)
        epochs = self.cfg.epochs_for(n)
        fit_cfg = FitConfig(**{**to_dict(self.cfg.induction_fit), "epochs": epochs})
        rows, notes = [], {}
        for condition in self.cfg.conditions:
            torch.manual_seed(run_seed)  # dropout: the same draws in a fresh or resumed run
            model, loss, note = self.start(condition, replicate, attempt, trained, sub, run_seed)
            if note:
                notes[condition] = note
            start = time.perf_counter()
            result = fit(model, train, loss, fit_cfg, seed=run_seed,
                         evaluate=lambda m: self.task.accuracy(m, val),
                         desc=f"{condition} r{replicate} n={n} s{seed}")
            rows.append({"arch": self.cfg.arch, "replicate": replicate, "n": n, "seed": seed,
                         "condition": condition, **self.evaluate(model),
                         "val_accuracy": result.best_score, "best_epoch": result.best_epoch,
                         "epochs": epochs, "seconds": time.perf_counter() - start})
        return {"rows": rows, "notes": notes}

    def cost(self, n: int) -> float:
        """A cell's relative cost: its epochs over n training and n_val validation images (a
        training step costs about three forward passes)."""
        return self.cfg.epochs_for(n) * (3 * n + self.cfg.n_val)

    def cells(self, chosen: dict[tuple, dict[str, Any]]) -> list[Cell]:
        """Every (pipeline, seed, n): its conditions trained on the same natural images."""
        files = ["base.safetensors", "subnetwork.safetensors"]
        if "random_subnet" in self.cfg.conditions:
            files += ["random_init.safetensors", "random_init_subnetwork.safetensors"]
        out = []
        for (r,), record in chosen.items():
            i = record["attempt"]
            inputs = tuple(f"{_attempt_dir(r, i)}/{f}" for f in files)
            out += [Cell(f"r{r}-a{i}-n{n}-s{s}", (r, i, n, s), inputs, self.cost(n))
                    for s in range(self.cfg.seeds) for n in self.cfg.grid]
        return out

    def report(self, chosen: dict[tuple, dict[str, Any]], cells: list[Cell],
               records: list[dict[str, Any]]) -> dict[str, Any]:
        rows = [row for record in records for row in record["rows"]]
        notes = {f"r{c.unit[0]} {k}": v for c, record in zip(cells, records, strict=True)
                 for k, v in record["notes"].items()}
        dirs = {f"r{r}": _attempt_dir(r, c["attempt"]) for (r,), c in chosen.items()}
        verify = {u: {k: read_json(self.run, f"{d}/{_prefix(k)}verify.json") for k in self.kinds}
                  for u, d in dirs.items()}
        bases = {u: read_json(self.run, f"{d}/base.json") for u, d in dirs.items()}
        write_json(self.run.path("verify.json"), verify)
        return write_report(self.run, self.cfg, rows, verify, bases,
                            {f"r{r}": c for (r,), c in chosen.items()}, self.data, notes,
                            to_dict(ShapeBiasConfig()), to_dict(self.cfg))


def _pipeline_dir(replicate: int) -> str:
    return f"pipelines/r{replicate}"


def _attempt_dir(replicate: int, attempt: int) -> str:
    return f"{_pipeline_dir(replicate)}/a{attempt}"


def _prefix(kind: str) -> str:
    """File-name prefix of a subnetwork's files: none for the trained model's."""
    return "" if kind == "trained" else f"{kind}_"


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def run_shapebias(cfg: ShapeBiasConfig, out: str | Path, log=print, threads: int = 1,
                  device: str = "cpu", workers: int = 1,
                  executor: Executor | None = None) -> dict[str, Any]:
    """Run the whole experiment into `out`; returns the summary.

    `threads` sets torch's intra-op threads per process: these models are small, and one thread
    is fastest on a busy CPU (more threads spin against each other). `workers` processes (or
    `executor`, e.g. a Ray cluster) run pipelines and induction cells side by side on `device`;
    results do not depend on either.
    """
    torch.set_num_threads(threads)
    return ShapeBiasRun(cfg, out, log, threads=threads, device=device,
                        executor=executor or LocalExecutor(workers)).execute()


__all__ = ["ALL_SHAPE_CONDITIONS", "ARCHS", "PRESETS", "SHAPE_CONDITIONS", "AugmentConfig",
           "ImageTask", "ShapeBiasConfig", "ShapeBiasData", "ShapeBiasGates", "ShapeBiasRun",
           "load_config", "load_data", "run_shapebias"]
