"""The `instill` command line: a thin layer over the Python API."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any

import click

from instill.errors import ConfigError, InstillError


def user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn user errors into one clear line (exit 2) and Ctrl-C into a resume hint (exit 130)."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except InstillError as err:
            click.echo(f"error: {err}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            out = kwargs.get("out")
            hint = f"; rerun the same command to resume from {out}" if out else ""
            click.echo(f"\ninterrupted{hint} (finished work is kept)", err=True)
            sys.exit(130)

    return wrapper


def _ints(text: str | None, name: str) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(f"--{name} takes comma-separated integers like '2,4', got {text!r}")\
            from None


def _densities(text: str | None) -> list[float | None] | None:
    """'native,0.05' -> [None, 0.05]."""
    if text is None:
        return None
    try:
        return [None if part == "native" else float(part) for part in _strings(text) or []]
    except ValueError:
        raise ConfigError(f"--densities takes 'native' or numbers like 'native,0.05', got "
                          f"{text!r}") from None


def _strings(text: str | None) -> list[str] | None:
    return None if text is None else [p.strip() for p in text.split(",") if p.strip()]


def _config(load_config: Callable[..., Any], preset: str | None, config_file: Path | None,
            overrides: dict[str, Any], assignments: tuple[str, ...] = ()) -> Any:
    """Layer the preset (`quick`, or `paper` under a --config file), the file, the flags that
    were given and the `--set KEY=VALUE` assignments into an experiment config."""
    from instill.runio import load_config_file, parse_assignments

    file_values = load_config_file(config_file) if config_file else None
    if preset is None:
        preset = "paper" if config_file else "quick"
    flags = {k: v for k, v in overrides.items() if v is not None}
    return load_config(preset, file_values, parse_assignments(assignments, into=flags))


def run_options(quick: str, paper: str, **more: str
                ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """The options every experiment command shares: --preset, --config and --out. `more`
    names a command's other presets and says what each is."""
    others = "".join(f"; '{name}' ({what})" for name, what in more.items())

    def add(fn: Callable[..., Any]) -> Callable[..., Any]:
        for option in reversed([
            click.option("--preset", type=click.Choice(["quick", "paper", *more]), default=None,
                         help=f"Built-in settings: 'quick' ({quick}; the default), 'paper' "
                              f"({paper}){others}."),
            click.option("--config", "config_file",
                         type=click.Path(dir_okay=False, path_type=Path),
                         help="YAML or JSON file of config values (unknown keys are errors)."),
            click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
                         help="Run directory; rerunning with the same directory resumes."),
            click.option("--set", "assignments", multiple=True, metavar="KEY=VALUE",
                         help="Any config value by its dotted key, e.g. base_fit.lr=1e-3 or "
                              "gates.enforce=false (repeatable; applied last)."),
        ]):
            fn = option(fn)
        return fn

    return add


def compute_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Where an experiment runs, the same on every command: threads, workers, device, and the
    executor (a local process pool, or Ray: a local instance or a cluster's address)."""
    for option in reversed([
        click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True,
                     help="Torch threads per process (small models run fastest on one)."),
        click.option("--workers", type=click.IntRange(min=1), default=None,
                     help="Processes (or Ray CPUs) running pipelines and cells side by side "
                          "[default: CPU count; 1 on a GPU, which one process fills with "
                          "batched stacks]."),
        click.option("--device", default="cpu", show_default=True,
                     help="Torch device of every process, e.g. cuda."),
        click.option("--executor", type=click.Choice(["local", "ray"]), default="local",
                     show_default=True,
                     help="Run pipelines and cells in a local process pool, or on Ray "
                          "(pip install 'instill[cluster]'; docs/scaling.md)."),
        click.option("--address", default=None, metavar="HOST:PORT",
                     help="With --executor ray: join this running Ray cluster instead of "
                          "starting a local instance."),
    ]):
        fn = option(fn)
    return fn


def _executor(kind: str, workers: int | None, address: str | None, device: str = "cpu") -> Any:
    from instill.experiments.executors import make_executor

    default = 1 if device.startswith("cuda") else os.cpu_count() or 1
    return make_executor(kind, workers=workers or default, address=address)


def _run(run: Callable[..., dict[str, Any]], cfg: Any, out: Path, threads: int,
         device: str, executor: str, workers: int | None, address: str | None) -> None:
    """Run an experiment into `out` on the chosen executor; print its headline and time."""
    start = time.perf_counter()
    summary = run(cfg, out, log=click.echo, threads=threads, device=device,
                  executor=_executor(executor, workers, address, device))
    click.echo(summary["headline"])
    click.echo(f"done in {time.perf_counter() - start:.0f} s; report: {out / 'report.md'}")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="instill")
def main() -> None:
    """Find the subnetwork a trained model uses for a subtask, and instill it in a new model."""


@main.command()
@run_options("9 replicate pipelines, subnetworks where discovery lands and at 0.05",
             "the paper's settings, GPU-sized",
             decide="the quick model at four densities against the same-size and the "
                    "reference's inverse controls; about an hour on 2 cores")
@click.option("--base", help="Base task expression, e.g. 'a + a*b'.")
@click.option("--subtask", help="Subtask expression the subnetwork is found for, e.g. 'a*b'.")
@click.option("--target", help="Target task expression, e.g. 'a^2 + a*b'.")
@click.option("--alternatives", help="Competing hypotheses on a == b, comma-separated.")
@click.option("--modulus", type=int, help="Answers are reduced modulo this (>= 2).")
@click.option("--numbers", type=int, help="Operands are 0 .. numbers-1.")
@click.option("--layers", help="Comma-separated GPT-2 depths, e.g. '2,4'.")
@click.option("--replicates", type=int,
              help="Independent pipelines (base model, subnetwork, cells) per depth.")
@click.option("--seeds", type=int, help="Downstream seeds per replicate and grid point.")
@click.option("--seed", type=int, help="Base random seed.")
@click.option("--grid", help="Comma-separated disambiguation sample counts.")
@click.option("--conditions", help="Comma-separated conditions, e.g. subnet,sampled,"
                                   "sampled-inverse,complement,complement-inverse,full,random,"
                                   "embeddings_only; also X-trainable and X-fresh variants "
                                   "(docs/arithmetic.md lists them all).")
@click.option("--densities", help="Comma-separated subnetwork densities: 'native' (where "
                                  "discovery lands) or target kept fractions, e.g. "
                                  "native,0.05,0.1.")
@click.option("--loss", type=click.Choice(["lm", "answer"]),
              help="Language-modelling loss on the whole sequence (paper) or answer only.")
@compute_options
@user_errors
def arithmetic(preset, config_file, out, assignments, threads, workers, device, executor,
               address, **flags) -> None:
    """Modular arithmetic: data efficiency of Subtask Induction against its controls."""
    from instill.experiments.arithmetic import load_config, run_arithmetic

    overrides = {
        **{k: v for k, v in flags.items() if v is not None and k in (
            "base", "subtask", "target", "modulus", "numbers", "replicates", "seeds", "seed",
            "loss")},
        "alternatives": _strings(flags["alternatives"]),
        "layers": _ints(flags["layers"], "layers"),
        "grid": _ints(flags["grid"], "grid"),
        "conditions": _strings(flags["conditions"]),
        "densities": _densities(flags["densities"]),
    }
    cfg = _config(load_config, preset, config_file, overrides, assignments)
    _run(run_arithmetic, cfg, out, threads, device, executor, workers, address)


@main.command()
@run_options("8 replicate pipelines, about 12 minutes on a 2-core CPU",
             "bigger world and model, the paper's optimizers; GPU-sized")
@click.option("--arch", help="Architecture: resnet or vit.")
@click.option("--classes", type=int, help="Number of shape (= texture) classes, 2..12.")
@click.option("--size", type=int, help="Image side in pixels.")
@click.option("--rho", type=float, help="Probability that a natural image's texture agrees "
                                        "with its shape.")
@click.option("--replicates", type=int,
              help="Independent pipelines (base model, subnetworks, cells).")
@click.option("--seeds", type=int, help="Downstream seeds per replicate and grid point.")
@click.option("--seed", type=int, help="Base random seed.")
@click.option("--grid", help="Comma-separated downstream natural training-set sizes.")
@click.option("--conditions", help="Comma-separated subset of subnet,sampled,complement,full,"
                                   "random,random_aug,random_subnet,embeddings_only,"
                                   "subnet-fresh,sampled-fresh,complement-fresh.")
@click.option("--train-dir", help="Class-per-folder natural images (replaces the generated "
                                  "natural sets; val/test held out by a seeded permutation).")
@click.option("--shape-dir", help="Class-per-folder shape-only (e.g. mean-pooled) images.")
@click.option("--cue-conflict-dir", help="Geirhos-style cue-conflict images "
                                         "(e.g. dog10-bird2.png).")
@compute_options
@user_errors
def shapebias(preset, config_file, out, assignments, threads, workers, device, executor,
              address, **flags) -> None:
    """Shape bias: instill a shape subnetwork in image classifiers (ResNet or ViT)."""
    from instill.experiments.shapebias import ARCHS, load_config, run_shapebias

    if flags["arch"] is not None and flags["arch"] not in ARCHS:
        raise ConfigError(f"unknown --arch {flags['arch']!r}; choose one of {list(ARCHS)}")
    overrides = {
        **{k: v for k, v in flags.items() if v is not None and k in (
            "arch", "classes", "size", "rho", "replicates", "seeds", "seed", "train_dir",
            "shape_dir", "cue_conflict_dir")},
        "grid": _ints(flags["grid"], "grid"),
        "conditions": _strings(flags["conditions"]),
    }
    cfg = _config(load_config, preset, config_file, overrides, assignments)
    _run(run_shapebias, cfg, out, threads, device, executor, workers, address)


@main.command()
@run_options("arithmetic: 5 replicate pipelines, about 24 minutes on a shared 2-core CPU (not "
             "timed idle); shapes: 6 pipelines, 1324 CPU-s, about 11 minutes on 2 idle cores "
             "(estimated)", "the paper-sized model and data, GPU-sized")
@click.option("--task", type=click.Choice(["arithmetic", "shapes"]),
              help="Arithmetic (the default) or shapes: shape and texture subnetworks of the "
                   "shape-bias experiment's ResNet (docs/modules.md).")
@click.option("--from", "from_run", type=click.Path(file_okay=False),
              help="Reuse the base models of this `instill arithmetic` run directory (with "
                   "--task shapes: of this `instill shapebias --arch resnet` run).")
@click.option("--base", help="Base task expression, e.g. 'a^2 + a*b + b'.")
@click.option("--subtasks", help="Comma-separated subtask expressions, e.g. 'a^2,a*b,b'.")
@click.option("--replicates", type=int, help="Independent pipelines (base model, subnetworks).")
@click.option("--seed", type=int, help="Base random seed.")
@compute_options
@user_errors
def modules(preset, config_file, out, assignments, threads, workers, device, executor, address,
            **flags) -> None:
    """Several subtasks in one model: overlap, cross-ablation, union induction, compression."""
    from instill.experiments.modules import load_config, run_modules
    from instill.experiments.modules_config import ShapesModulesConfig
    from instill.experiments.modules_shapes import run_modules_shapes

    overrides = {
        **{k: v for k, v in flags.items() if v is not None and k in (
            "task", "from_run", "base", "replicates", "seed")},
        "subtasks": _strings(flags["subtasks"]),
    }
    cfg = _config(load_config, preset, config_file, overrides, assignments)
    run = run_modules_shapes if isinstance(cfg, ShapesModulesConfig) else run_modules
    _run(run, cfg, out, threads, device, executor, workers, address)


@main.command()
@click.argument("run_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--replicate", type=click.IntRange(min=0), default=0, show_default=True,
              help="Which pipeline's base model.")
@click.option("--mask", default="base", show_default=True,
              help="'base' (the base task's subnetwork), a subtask expression (with --task "
                   "shapes: 'shape' or 'texture'), or 'magnitude:F' (global magnitude pruning "
                   "keeping the fraction F).")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Sparse safetensors file to write.")
@user_errors
def bake(run_dir, replicate, mask, out) -> None:
    """Export a pruned base model of an `instill modules` run as sparse safetensors."""
    from instill.experiments.modules import ModulesRun, load_config
    from instill.experiments.modules_common import recorded_config
    from instill.experiments.modules_config import ShapesModulesConfig
    from instill.experiments.modules_shapes import ModulesShapesRun

    cfg = load_config(None, recorded_config(run_dir, "instill modules"))
    run_class = ModulesShapesRun if isinstance(cfg, ShapesModulesConfig) else ModulesRun
    sizes = run_class(cfg, run_dir, lambda _: None).bake(replicate, mask, out)
    click.echo(f"wrote {out}: density {sizes['density']:.4f}, dense {sizes['dense_bytes']} "
               f"bytes, sparse {sizes['sparse_bytes']} bytes")


@main.group()
def shapes() -> None:
    """The generated shape/texture world."""


@shapes.command("preview")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="PNG file to write.")
@click.option("--classes", type=int, default=8, show_default=True,
              help="Number of shape (= texture) classes, 2..12.")
@click.option("--size", type=int, default=32, show_default=True, help="Image side in pixels.")
@click.option("--rho", type=float, default=0.9, show_default=True,
              help="Probability that a natural image's texture agrees with its shape.")
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed.")
@click.option("--per-split", type=int, default=8, show_default=True,
              help="Images per split (row).")
@user_errors
def shapes_preview(out, classes, size, rho, seed, per_split) -> None:
    """Write a grid of natural, shape_only and cue_conflict examples."""
    from instill.tasks.shapes import ShapeWorld, preview_grid

    world = ShapeWorld(classes=classes, size=size, rho=rho)
    click.echo(f"wrote {preview_grid(world, seed, out, per_split=per_split)}")


@main.command()
@click.argument("in_dir", type=click.Path(path_type=Path))
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--method", type=click.Choice(["slic", "felzenszwalb"]), default="slic",
              show_default=True, help="Superpixel segmentation.")
@click.option("--segments", type=int, default=64, show_default=True,
              help="About how many segments per image.")
@user_errors
def meanpool(in_dir, out_dir, method, segments) -> None:
    """Mean-pool every image of IN_DIR into OUT_DIR (texture removed, shape kept); resumes."""
    from instill.tasks.meanpool import mean_pool_folder

    written = mean_pool_folder(in_dir, out_dir, method=method, n_segments=segments)
    click.echo(f"wrote {written} image(s) to {out_dir}")



@main.command()
@run_options("5 replicates of 7 methods on 4 tasks, shapes with a PackNet sweep too, digits "
             "(5 tasks) with packnet@0.1 and supsup; about 12 (arithmetic) or 4 (shapes) "
             "minutes on 2 idle cores, digits under 150 (split) or 680 (permuted) CPU-seconds",
             "8 replicates, every method, longer training")
@click.option("--task", type=click.Choice(["arithmetic", "shapes", "digits-split",
                                           "digits-permuted"]),
              help="Task sequence: arithmetic expressions with a task token (default), the "
                   "shape world split into class groups (shapes.groups) with a head per task, "
                   "or real handwritten digits (scikit-learn's, or digits.image_dir) split into "
                   "class pairs or pixel-permuted, with a head per task.")
@click.option("--sequence", help="Semicolon-separated task expressions, e.g. 'a + b;a*b' "
                                 "(arithmetic only).")
@click.option("--methods", help="Comma-separated subset of subnetwork,subnetwork-reinit,packnet,"
                                "packnet-reinit,finetune,replay,joint,independent,supsup; "
                                "packnet@F (e.g. packnet@0.1) keeps fraction F of the free "
                                "weights.")
@click.option("--replicates", type=int, help="Independent replicates (initial model, seeds).")
@click.option("--seed", type=int, help="Base random seed.")
@compute_options
@user_errors
def continual(preset, config_file, out, assignments, threads, workers, device, executor,
              address, **flags) -> None:
    """Continual learning: isolate each task's discovered subnetwork; compare with PackNet,
    SupSup, fine-tuning, replay and joint training (ACC, BWT, FWT, forgetting, capacity)."""
    from instill.experiments.continual import load_config, run_continual

    sequence = flags["sequence"]
    overrides = {
        **{k: v for k, v in flags.items() if v is not None and k in ("task", "replicates",
                                                                     "seed")},
        "sequence": None if sequence is None else [p.strip() for p in sequence.split(";")
                                                   if p.strip()],
        "methods": _strings(flags["methods"]),
    }
    cfg = _config(load_config, preset, config_file, overrides, assignments)
    _run(run_continual, cfg, out, threads, device, executor, workers, address)


if __name__ == "__main__":
    main()
