"""Experiment B of the paper: instilling a shape bias in an image classifier.

The generated ShapeWorld (`instill.tasks.shapes`) stands in for ImageNet: on `natural` images the
label is the object's shape and the texture agrees with probability `rho`, so texture is an easy
shortcut and a model trained there becomes texture-biased. Phases (each skipped when its output
exists, so an interrupted run resumes):

1. train the base model (HF ResNet or ViT) on `natural` images; measure its shape bias;
2. discover the shape subnetwork on `shape_only` images (the "mean-pooled ImageNet" analogue)
   and verify it; with `random_subnet` in the conditions, also discover one with the same
   settings in a randomly initialized model (is the trained model needed?);
3. induction: cells of downstream size n x seed, every condition trained on the same `natural`
   images: subnet, sampled, complement, full, random (`common.starting_model`), random_aug
   (random init trained with a shape-preserving, texture-destroying augmentation) and
   random_subnet (the random-init subnetwork transplanted like `subnet`);
4. evaluate each model: accuracy on held-out natural and shape_only images, shape bias on
   cue-conflict images;
5. report (`shapebias_report`).

Real image folders (`train_dir`, `shape_dir`, `cue_conflict_dir`) replace the generated splits.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from instill.checkpoint import load_model, save_model
from instill.core import MaskConfig, Subnetwork, fresh_init, transplant
from instill.errors import ConfigError, InstillError
from instill.experiments.common import (
    CONDITIONS,
    layered_config,
    starting_model,
    verify_subnetwork,
)
from instill.models import build_model, logits_of
from instill.runio import RunDir, to_dict, write_json
from instill.tasks.images import (
    ImageSet,
    load_cue_conflict_folder,
    load_image_folder,
    shape_bias,
)
from instill.tasks.shapes import ShapeWorld, make_split
from instill.training import DiscoveryConfig, FitConfig, discover, fit

#: Every condition this experiment compares: the shared ones plus two controls of its own.
SHAPE_CONDITIONS = (*CONDITIONS, "random_aug", "random_subnet")
ARCHS = ("resnet", "vit")


@dataclass
class ResNetSpec:
    """A small HF ResNet (`build_model("resnet")`); (64, [64,128,256,512], [2,2,2,2]) is
    ResNet-18's layout."""

    embedding_size: int = 64
    hidden_sizes: list[int] = field(default_factory=lambda: [64, 128, 256, 512])
    depths: list[int] = field(default_factory=lambda: [2, 2, 2, 2])
    layer_type: Literal["basic", "bottleneck"] = "basic"

    def __post_init__(self) -> None:
        if not self.hidden_sizes or len(self.hidden_sizes) != len(self.depths):
            raise ConfigError(f"resnet.hidden_sizes and resnet.depths must be non-empty lists of "
                              f"the same length, got {self.hidden_sizes} and {self.depths}")
        if min(self.hidden_sizes + self.depths + [self.embedding_size]) < 1:
            raise ConfigError("resnet sizes and depths must be >= 1")


@dataclass
class ViTSpec:
    """A small HF ViT (`build_model("vit")`); the image size comes from the world's `size`."""

    patch_size: int = 8
    hidden_size: int = 192
    num_hidden_layers: int = 12
    num_attention_heads: int = 3
    intermediate_size: int = 768
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"vit.hidden_size ({self.hidden_size}) must be divisible by "
                              f"vit.num_attention_heads ({self.num_attention_heads})")
        if min(self.patch_size, self.num_hidden_layers, self.intermediate_size) < 1:
            raise ConfigError("vit sizes must be >= 1")


@dataclass
class AugmentConfig:
    """The `random_aug` control's shape-preserving augmentation, applied per image in the loss.

    Pixel-wise colour changes (grayscale, channel permutation, per-channel inversion) destroy
    the colour statistics a texture shortcut relies on; a light box blur and Gaussian noise
    blunt fine patterns. None of them moves a pixel, so the silhouette is untouched.
    """

    permute: bool = True
    invert: float = 0.5      # probability of inverting each colour channel
    grayscale: float = 0.25  # probability of turning the image gray
    blur: float = 0.5        # probability of a 3x3 box blur
    noise: float = 0.05      # std of additive Gaussian noise

    def __post_init__(self) -> None:
        for name in ("invert", "grayscale", "blur"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"augment.{name} is a probability in [0, 1], got "
                                  f"{getattr(self, name)}")
        if not self.noise >= 0:
            raise ConfigError(f"augment.noise must be >= 0, got {self.noise}")


@dataclass
class ShapeBiasConfig:
    """Everything that defines a shape-bias run; the defaults are the `paper` preset (the
    paper's optimisation settings on a bigger world; GPU-sized)."""

    arch: Literal["resnet", "vit"] = "resnet"
    classes: int = 12
    size: int = 64
    # 0.95 makes the base model about as texture-biased as an ImageNet ResNet-50 (shape bias
    # ~0.2 on the quick preset); at 0.9 it learns more shape (0.42). See docs/shapebias.md.
    rho: float = 0.95
    resnet: ResNetSpec = field(default_factory=ResNetSpec)
    vit: ViTSpec = field(default_factory=ViTSpec)
    seed: int = 0
    seeds: int = 3
    base_samples: int = 50_000
    base_val: int = 2000
    base_fit: FitConfig = field(default_factory=lambda: FitConfig(
        epochs=60, batch_size=128, lr=1e-3, weight_decay=0.05, patience=10))
    discovery_samples: int = 20_000
    discovery: DiscoveryConfig = field(default_factory=lambda: DiscoveryConfig(
        epochs=100, batch_size=32, lr=1e-3, final_temperature=100.0,
        mask=MaskConfig(l0_lambda=1e-8, init=0.1)))
    grid: list[int] = field(default_factory=lambda: [500, 2000, 8000])
    conditions: list[str] = field(default_factory=lambda: list(SHAPE_CONDITIONS))
    induction_fit: FitConfig = field(default_factory=lambda: FitConfig(
        epochs=20, batch_size=64, lr=1e-3, weight_decay=1e-4, optimizer="sgd", momentum=0.9))
    induction_min_examples: int = 0  # train on at least this many examples: small n, more epochs
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    n_val: int = 2000
    n_test: int = 5000
    n_eval: int = 2000  # shape_only and cue_conflict evaluation images
    freeze: bool = True
    keep_unmasked: bool = True
    train_dir: str | None = None
    shape_dir: str | None = None
    cue_conflict_dir: str | None = None
    holdout: float = 0.2  # real folders: fraction held out (train: half val, half test)

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ConfigError(f"unknown arch {self.arch!r}; choose one of {list(ARCHS)}")
        self.world  # noqa: B018  (validates classes, size and rho)
        if self.arch == "vit" and self.size % self.vit.patch_size:
            raise ConfigError(f"vit.patch_size ({self.vit.patch_size}) must divide the image "
                              f"size ({self.size})")
        if self.seeds < 1:
            raise ConfigError(f"seeds must be >= 1, got {self.seeds}")
        if not self.grid or min(self.grid) < 1:
            raise ConfigError(f"grid must be a non-empty list of counts >= 1, got {self.grid}")
        unknown = sorted(set(self.conditions) - set(SHAPE_CONDITIONS))
        if unknown or not self.conditions:
            raise ConfigError(f"unknown conditions {unknown}; choose from "
                              f"{list(SHAPE_CONDITIONS)}")
        for name in ("base_samples", "base_val", "discovery_samples", "n_val", "n_test",
                     "n_eval"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.induction_min_examples < 0:
            raise ConfigError("induction_min_examples must be >= 0")
        if not 0 < self.holdout < 1:
            raise ConfigError(f"holdout must be in (0, 1), got {self.holdout}")

    @property
    def world(self) -> ShapeWorld:
        return ShapeWorld(classes=self.classes, size=self.size, rho=self.rho)

    def epochs_for(self, n: int) -> int:
        """Induction epochs for n training images: the configured epochs, or more when that
        would show fewer than `induction_min_examples` examples."""
        return max(self.induction_fit.epochs, math.ceil(self.induction_min_examples / n))


PRESETS: dict[str, dict[str, Any]] = {
    "paper": {},
    "quick": {
        "classes": 8,
        "size": 32,
        "rho": 0.95,
        "resnet": {"embedding_size": 16, "hidden_sizes": [16, 32, 64], "depths": [1, 1, 1]},
        "vit": {"patch_size": 8, "hidden_size": 64, "num_hidden_layers": 4,
                "num_attention_heads": 4, "intermediate_size": 128},
        "seeds": 2,
        "base_samples": 4000,
        "base_val": 500,
        "base_fit": {"epochs": 30, "batch_size": 64, "lr": 2e-3, "weight_decay": 0.01,
                     "patience": 6, "fused": True},
        "discovery_samples": 4000,
        "discovery": {"epochs": 15, "batch_size": 64, "lr": 1e-2, "mask": {"l0_lambda": 1e-5},
                      "fused": True},
        "grid": [250, 1000],
        "induction_fit": {"epochs": 10, "batch_size": 32, "lr": 2e-3, "weight_decay": 0.01,
                          "optimizer": "adamw", "fused": True},
        "induction_min_examples": 12_000,
        "n_val": 500,
        "n_test": 1000,
        "n_eval": 1000,
    },
}


def load_config(preset: str | None = "paper", file_values: dict | None = None,
                overrides: dict | None = None) -> ShapeBiasConfig:
    """Defaults, then the preset, then a config file's values, then command-line overrides."""
    return layered_config(ShapeBiasConfig, PRESETS, preset, file_values, overrides,
                          "shapebias config")


# -- augmentation -----------------------------------------------------------------------------
_PERMUTATIONS = torch.tensor([[0, 1, 2], [0, 2, 1], [1, 0, 2], [1, 2, 0], [2, 0, 1], [2, 1, 0]])
_LUMA = torch.tensor([0.299, 0.587, 0.114])


def shape_preserving_augment(images: Tensor, generator: torch.Generator,
                             cfg: AugmentConfig) -> Tensor:
    """Per-image random colour permutation/inversion/grayscale, blur and noise of a batch
    [n, 3, S, S] in [0, 1]; pixel positions never move, so the silhouette is kept."""
    n, dev = images.shape[0], images.device

    def rand(*shape: int) -> Tensor:
        return torch.rand(*shape, generator=generator).to(dev)

    x = images
    if cfg.grayscale > 0:  # first: the original colours' brightness contrast survives it
        gray = (x * _LUMA.to(dev)[None, :, None, None]).sum(1, keepdim=True).expand_as(x)
        x = torch.where((rand(n) < cfg.grayscale)[:, None, None, None], gray, x)
    if cfg.permute:
        perm = _PERMUTATIONS[torch.randint(0, 6, (n,), generator=generator)].to(dev)
        x = torch.gather(x, 1, perm[:, :, None, None].expand_as(x))
    if cfg.invert > 0:  # keeps every channel's |object - background| contrast
        x = torch.where((rand(n, 3) < cfg.invert)[:, :, None, None], 1 - x, x)
    if cfg.blur > 0:
        blurred = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
        x = torch.where((rand(n) < cfg.blur)[:, None, None, None], blurred, x)
    if cfg.noise > 0:
        x = x + torch.randn(x.shape, generator=generator).to(dev) * cfg.noise
    return x.clamp(0.0, 1.0)


# -- the task -------------------------------------------------------------------------------
class ImageTask:
    """Cross-entropy on (images, labels) batches; accuracy and shape bias of a model."""

    def __init__(self, augment: AugmentConfig, batch_size: int = 500) -> None:
        self.augment_cfg, self.batch_size = augment, batch_size

    @staticmethod
    def normalize(images: Tensor) -> Tensor:
        return (images - 0.5) / 0.25

    def loss(self, model: nn.Module, batch: Sequence[Tensor]) -> Tensor:
        images, labels = batch
        return F.cross_entropy(logits_of(model(pixel_values=self.normalize(images))).float(),
                               labels)

    def augmented_loss(self, seed: int) -> Callable[[nn.Module, Sequence[Tensor]], Tensor]:
        """The loss on shape-preserving augmentations of each batch (a seeded stream)."""
        generator = torch.Generator().manual_seed(seed)

        def loss(model: nn.Module, batch: Sequence[Tensor]) -> Tensor:
            images, labels = batch
            return self.loss(model, (shape_preserving_augment(images, generator,
                                                              self.augment_cfg), labels))

        return loss

    @torch.no_grad()
    def predict(self, model: nn.Module, images: Tensor) -> Tensor:
        model.eval()
        device = next(model.parameters()).device
        outs = [logits_of(model(pixel_values=self.normalize(chunk.to(device)))).argmax(-1).cpu()
                for chunk in images.split(self.batch_size)]
        return torch.cat(outs)

    def accuracy(self, model: nn.Module, data: ImageSet) -> float:
        return (self.predict(model, data.images) == data.labels).float().mean().item()

    def shape_bias(self, model: nn.Module, data: ImageSet) -> dict[str, Any]:
        return shape_bias(self.predict(model, data.images), data.shapes, data.textures)


# -- data ---------------------------------------------------------------------------------------
@dataclass
class ShapeBiasData:
    """Every image set a run uses. `pool(seed)` is the downstream natural set of one seed (its
    first n images train the cell of size n)."""

    class_names: list[str]
    base_train: ImageSet
    base_val: ImageSet
    val: ImageSet
    test: ImageSet
    shape_train: ImageSet
    shape_eval: ImageSet
    cue_conflict: ImageSet
    pool: Callable[[int], ImageSet]
    pool_size: int
    sources: dict[str, str]

    def describe(self) -> dict[str, Any]:
        sets = ("base_train", "base_val", "val", "test", "shape_train", "shape_eval",
                "cue_conflict")
        return {"classes": self.class_names, "sources": self.sources,
                "sizes": {s: len(getattr(self, s)) for s in sets} | {"pool": self.pool_size}}


_DATA_OFFSETS = {"base_train": 1, "base_val": 2, "val": 3, "test": 4, "shape_train": 5,
                 "shape_eval": 6, "cue_conflict": 7, "pool": 100}


def _data_seed(cfg: ShapeBiasConfig, kind: str, extra: int = 0) -> int:
    return cfg.seed * 1_000_003 + _DATA_OFFSETS[kind] + extra


def _split_folder(data: ImageSet, fraction: float, seed: int) -> tuple[ImageSet, ImageSet]:
    """(held-out part, rest) by a seeded permutation; each part keeps at least one image."""
    if len(data) < 2:
        raise ConfigError(f"the folder for {data.split!r} has {len(data)} image(s); it needs "
                          "at least 2 to hold some out for evaluation")
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    k = min(max(1, round(fraction * len(data))), len(data) - 1)
    return data.subset(order[:k]), data.subset(order[k:])


def check_dirs(cfg: ShapeBiasConfig) -> None:
    """Fail fast, before any training, on a real-data folder that is not there."""
    for name in ("train_dir", "shape_dir", "cue_conflict_dir"):
        value = getattr(cfg, name)
        if value is None:
            continue
        if not Path(value).exists():
            raise ConfigError(f"--{name.replace('_', '-')} {value!r} does not exist")
        if not Path(value).is_dir():
            raise ConfigError(f"--{name.replace('_', '-')} {value!r} is not a directory")


def load_data(cfg: ShapeBiasConfig) -> ShapeBiasData:
    """Generate (or read from the real folders given in the config) every image set."""
    check_dirs(cfg)
    world = cfg.world
    sources: dict[str, str] = {}
    gen: Callable[[str, int, str], ImageSet] = \
        lambda split, n, kind: make_split(world, split, n, _data_seed(cfg, kind))  # noqa: E731

    if cfg.train_dir is not None:
        everything = load_image_folder(cfg.train_dir, cfg.size)
        names = everything.class_names
        held, rest = _split_folder(everything, cfg.holdout, _data_seed(cfg, "val"))
        if len(held) < 2:
            raise ConfigError(f"--train-dir {cfg.train_dir!r} has too few images to hold out a "
                              f"validation and a test set (holdout {cfg.holdout})")
        half = len(held) // 2
        val, test = held.subset(range(half)), held.subset(range(half, len(held)))
        base_train, base_val, pool_all = rest, val, rest
        sources["natural"] = str(cfg.train_dir)

        def pool(seed: int) -> ImageSet:
            gen_ = torch.Generator().manual_seed(_data_seed(cfg, "pool", seed))
            return pool_all.subset(torch.randperm(len(pool_all), generator=gen_))

        pool_size = len(pool_all)
    else:
        names = world.shape_names
        base_train = gen("natural", cfg.base_samples, "base_train")
        base_val = gen("natural", cfg.base_val, "base_val")
        val, test = gen("natural", cfg.n_val, "val"), gen("natural", cfg.n_test, "test")
        pool_size = max(cfg.grid)
        sources["natural"] = f"generated ShapeWorld(classes={cfg.classes}, size={cfg.size}, " \
                             f"rho={cfg.rho})"

        cache: dict[int, ImageSet] = {}

        def pool(seed: int) -> ImageSet:  # cells of one seed run in a row: keep the last one
            if seed not in cache:
                cache.clear()
                cache[seed] = make_split(world, "natural", pool_size,
                                         _data_seed(cfg, "pool", seed))
            return cache[seed]

    def need_world(what: str, option: str) -> None:
        if names != world.shape_names:
            raise ConfigError(
                f"--train-dir's classes {names[:6]} are not the generated world's "
                f"{world.shape_names[:6]}, so the generated {what} images cannot be used with "
                f"them: give {option} (shape-only images can be made with `instill meanpool "
                "TRAIN_DIR OUT_DIR`)")

    if cfg.shape_dir is not None:
        shapes = load_image_folder(cfg.shape_dir, cfg.size, class_names=names)
        shape_eval, shape_train = _split_folder(shapes, cfg.holdout,
                                                _data_seed(cfg, "shape_eval"))
        sources["shape_only"] = str(cfg.shape_dir)
    else:
        need_world("shape-only", "--shape-dir")
        shape_train = gen("shape_only", cfg.discovery_samples, "shape_train")
        shape_eval = gen("shape_only", cfg.n_eval, "shape_eval")
        sources["shape_only"] = "generated"
    if cfg.cue_conflict_dir is not None:
        cue = load_cue_conflict_folder(cfg.cue_conflict_dir, cfg.size, class_names=names)
        sources["cue_conflict"] = str(cfg.cue_conflict_dir)
    else:
        need_world("cue-conflict", "--cue-conflict-dir")
        cue = gen("cue_conflict", cfg.n_eval, "cue_conflict")
        sources["cue_conflict"] = "generated"
    if max(cfg.grid) > pool_size:
        raise ConfigError(f"the grid asks for {max(cfg.grid)} downstream images but only "
                          f"{pool_size} are available from --train-dir after holding out "
                          f"{len(val) + len(test)}; lower --grid")
    return ShapeBiasData(list(names), base_train, base_val, val, test, shape_train, shape_eval,
                         cue, pool, pool_size, sources)


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
class ShapeBiasRun:
    """One run directory: each phase reads what earlier phases wrote, and skips finished work."""

    def __init__(self, cfg: ShapeBiasConfig, out: str | Path, log=print,
                 device: str = "cpu") -> None:
        check_dirs(cfg)  # before the output directory is made
        self.cfg, self.log, self.device = cfg, log, torch.device(device)
        self.run = RunDir(out)
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

    def evaluate(self, model: nn.Module) -> dict[str, Any]:
        """Held-out natural accuracy, shape_only accuracy, shape bias on cue-conflict images."""
        bias = self.task.shape_bias(model, self.data.cue_conflict)
        return {"natural_accuracy": self.task.accuracy(model, self.data.test),
                "shape_only_accuracy": self.task.accuracy(model, self.data.shape_eval),
                "shape_bias": bias["shape_bias"], "shape_hits": bias["shape_hits"],
                "texture_hits": bias["texture_hits"], "other": bias["other"],
                "cue_conflict_n": bias["n"]}

    def prepare(self) -> None:
        """Check the config against an earlier run in the same directory; record it."""
        self.run.begin(to_dict(self.cfg), self.cfg.seed, self.log)

    def base_model(self) -> nn.Module:
        """Phase 1: train (or load) the base model on natural images."""
        path = self.run.path("base/model.safetensors")
        if path.exists():
            model = self.build()
            load_model(path, model)
            return model.eval()
        seed = self.cfg.seed * 1000 + 1
        torch.manual_seed(seed)
        model = self.build()
        val = self.data.base_val
        start = time.perf_counter()
        result = fit(model, self.tensors(self.data.base_train), self.task.loss, self.cfg.base_fit,
                     seed=seed, evaluate=lambda m: self.task.accuracy(m, val), desc="base")
        info = {"arch": self.cfg.arch, "val_accuracy": result.best_score,
                "best_epoch": result.best_epoch, "seconds": time.perf_counter() - start,
                "parameters": sum(p.numel() for p in model.parameters()),
                **self.evaluate(model), "history": result.history}
        write_json(self.run.path("base/model.json"), info)
        save_model(path, model, {"arch": self.cfg.arch})
        self.log(f"base {self.cfg.arch}: natural accuracy {info['natural_accuracy']:.3f}, "
                 f"shape_only {info['shape_only_accuracy']:.3f}, shape bias "
                 f"{_fmt(info['shape_bias'])} (epoch {result.best_epoch})")
        return model

    def random_model(self, trained: nn.Module) -> nn.Module:
        """A randomly initialized model of the same architecture (saved for the record)."""
        path = self.run.path("base/random_init.safetensors")
        model = fresh_init(trained, self.cfg.seed * 1000 + 2)
        if path.exists():
            load_model(path, model)
        else:
            save_model(path, model, {"arch": self.cfg.arch, "note": "random init"})
        return model.eval()

    def subnetwork(self, kind: str, model: nn.Module) -> Subnetwork:
        """Phase 2: discover (or load) the shape subnetwork of the `trained` or `random_init`
        model on shape_only images (the same settings for both)."""
        path = self.run.path(f"subnetworks/{kind}.safetensors")
        if path.exists():
            return Subnetwork.load(path)
        seed = self.cfg.seed * 1000 + 500
        start = time.perf_counter()
        sub, history = discover(model, self.tensors(self.data.shape_train), self.task.loss,
                                self.cfg.discovery, seed=seed, desc=f"discover {kind}")
        write_json(self.run.path(f"subnetworks/{kind}.json"),
                   {"history": history, "seconds": time.perf_counter() - start})
        sub = Subnetwork(sub.masks, sub.fingerprint,
                         {**sub.metadata, "subtask": "shape_only", "source": kind,
                          "arch": self.cfg.arch})
        sub.save(path)
        self.log(f"subnetwork ({kind}): density {sub.density():.4f} ({sub.kept()} weights)")
        # Read it back: the file's mask order (which seeded random controls consume) is then the
        # same in this run and in a resumed one.
        return Subnetwork.load(path)

    def verify(self, model: nn.Module, sub: Subnetwork) -> dict[str, Any]:
        """The subnetwork alone, ablated, and a same-size random ablation."""
        metrics = {
            "shape_only": lambda m: self.task.accuracy(m, self.data.shape_eval),
            "natural": lambda m: self.task.accuracy(m, self.data.test),
            "shape_bias": lambda m: self.task.shape_bias(m, self.data.cue_conflict)["shape_bias"],
        }
        return verify_subnetwork(model, sub, metrics, self.cfg.seed * 1000 + 700)

    def cell(self, n: int, seed: int, models: dict[str, tuple[nn.Module, Subnetwork | None]]
             ) -> list[dict[str, Any]]:
        """Phase 3 unit of work: every condition trained on the same n natural images."""
        path = self.run.path(f"cells/n{n}-s{seed}.json")
        if path.exists():
            return json.loads(path.read_text())["rows"]
        train = self.tensors(self.data.pool(seed).subset(range(n)))
        val = self.data.val
        run_seed = (self.cfg.seed + seed) * 100_003 + n
        epochs = self.cfg.epochs_for(n)
        fit_cfg = FitConfig(**{**to_dict(self.cfg.induction_fit), "epochs": epochs})
        trained, sub = models["trained"]
        rows, notes = [], {}
        for condition in self.cfg.conditions:
            loss = self.task.loss
            try:
                if condition == "random_aug":
                    model = starting_model("random", trained, sub, run_seed)
                    loss = self.task.augmented_loss(run_seed)
                elif condition == "random_subnet":
                    random_model, random_sub = models["random_init"]
                    model = starting_model("subnet", random_model, random_sub, run_seed,
                                           freeze=self.cfg.freeze,
                                           keep_unmasked=self.cfg.keep_unmasked)
                else:
                    model = starting_model(condition, trained, sub, run_seed,
                                           freeze=self.cfg.freeze,
                                           keep_unmasked=self.cfg.keep_unmasked)
            except InstillError as err:
                if condition != "complement":
                    raise
                # More than half of some layer is in the subnetwork: no same-size complement.
                capped, notes[condition] = capped_complement(
                    sub, torch.Generator().manual_seed(run_seed))
                model = transplant(trained, capped, freeze=self.cfg.freeze,
                                   keep_unmasked=self.cfg.keep_unmasked, seed=run_seed)
                self.log(f"note: {err}; the complement keeps every weight outside the "
                         f"subnetwork there ({notes[condition]})")
            start = time.perf_counter()
            result = fit(model, train, loss, fit_cfg, seed=run_seed,
                         evaluate=lambda m: self.task.accuracy(m, val),
                         desc=f"{condition} n={n} s{seed}")
            rows.append({"arch": self.cfg.arch, "n": n, "seed": seed, "condition": condition,
                         **self.evaluate(model), "val_accuracy": result.best_score,
                         "best_epoch": result.best_epoch, "epochs": epochs,
                         "seconds": time.perf_counter() - start})
        write_json(path, {"rows": rows, "notes": notes})
        return rows

    def execute(self) -> dict[str, Any]:
        """Run every phase (resuming finished work) and write the report."""
        from instill.experiments.shapebias_report import write_report

        self.prepare()
        trained = self.base_model()
        sub = self.subnetwork("trained", trained)
        models: dict[str, tuple[nn.Module, Subnetwork | None]] = {"trained": (trained, sub)}
        verify = {"trained": self.verify(trained, sub)}
        if "random_subnet" in self.cfg.conditions:
            random_model = self.random_model(trained)
            random_sub = self.subnetwork("random_init", random_model)
            models["random_init"] = (random_model, random_sub)
            verify["random_init"] = self.verify(random_model, random_sub)
        write_json(self.run.path("verify.json"), verify)
        rows = []
        cells = [(n, s) for s in range(self.cfg.seeds) for n in self.cfg.grid]
        for n, seed in tqdm(cells, desc="induction", disable=None):
            rows += self.cell(n, seed, models)
        base = json.loads(self.run.path("base/model.json").read_text())
        return write_report(self.run, self.cfg, rows, verify, base, self.data)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def run_shapebias(cfg: ShapeBiasConfig, out: str | Path, log=print, threads: int = 1,
                  device: str = "cpu") -> dict[str, Any]:
    """Run the whole experiment into `out`; returns the summary.

    `threads` sets torch's intra-op threads: these models are small, and one thread per process
    is fastest on a busy CPU (more threads spin against each other).
    """
    torch.set_num_threads(threads)
    return ShapeBiasRun(cfg, out, log, device).execute()


__all__ = ["PRESETS", "SHAPE_CONDITIONS", "AugmentConfig", "ImageTask", "ShapeBiasConfig",
           "ShapeBiasData", "ShapeBiasRun", "load_config", "load_data", "run_shapebias",
           "shape_preserving_augment"]
