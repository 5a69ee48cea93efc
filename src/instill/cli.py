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


def _strings(text: str | None) -> list[str] | None:
    return None if text is None else [p.strip() for p in text.split(",") if p.strip()]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="instill")
def main() -> None:
    """Find the subnetwork a trained model uses for a subtask, and instill it in a new model."""


@main.command()
@click.option("--preset", type=click.Choice(["quick", "paper"]), default=None,
              help="Built-in settings: 'quick' (a few minutes on a CPU; the default) or "
                   "'paper' (the paper's, GPU-sized).")
@click.option("--config", "config_file", type=click.Path(dir_okay=False, path_type=Path),
              help="YAML or JSON file of config values (unknown keys are errors).")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Run directory; rerunning with the same directory resumes.")
@click.option("--base", help="Base task expression, e.g. 'a + a*b'.")
@click.option("--subtask", help="Subtask expression the subnetwork is found for, e.g. 'a*b'.")
@click.option("--target", help="Target task expression, e.g. 'a^2 + a*b'.")
@click.option("--alternatives", help="Competing hypotheses on a == b, comma-separated.")
@click.option("--modulus", type=int, help="Answers are reduced modulo this (>= 2).")
@click.option("--numbers", type=int, help="Operands are 0 .. numbers-1.")
@click.option("--layers", help="Comma-separated GPT-2 depths, e.g. '2,4'.")
@click.option("--seeds", type=int, help="Number of seeds per grid point.")
@click.option("--seed", type=int, help="Base random seed.")
@click.option("--grid", help="Comma-separated disambiguation sample counts.")
@click.option("--conditions", help="Comma-separated subset of subnet,sampled,complement,full,"
                                   "random.")
@click.option("--loss", type=click.Choice(["lm", "answer"]),
              help="Language-modelling loss on the whole sequence (paper) or answer only.")
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True,
              help="Torch threads per process (tiny models run fastest on one).")
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="Processes running induction cells side by side [default: CPU count].")
@user_errors
def arithmetic(preset, config_file, out, threads, workers, **flags) -> None:
    """Modular arithmetic: data efficiency of Subtask Induction against its controls."""
    from instill.experiments.arithmetic import load_config, run_arithmetic
    from instill.runio import load_config_file

    overrides = {
        **{k: v for k, v in flags.items() if v is not None and k in (
            "base", "subtask", "target", "modulus", "numbers", "seeds", "seed", "loss")},
        "alternatives": _strings(flags["alternatives"]),
        "layers": _ints(flags["layers"], "layers"),
        "grid": _ints(flags["grid"], "grid"),
        "conditions": _strings(flags["conditions"]),
    }
    overrides = {k: v for k, v in overrides.items() if v is not None}
    file_values = load_config_file(config_file) if config_file else None
    if preset is None:
        preset = "paper" if config_file else "quick"
    cfg = load_config(preset, file_values, overrides)
    start = time.perf_counter()
    workers = workers or os.cpu_count() or 1
    summary = run_arithmetic(cfg, out, log=click.echo, threads=threads, workers=workers)
    from instill.experiments.arithmetic_report import headline

    click.echo(headline(cfg, summary))
    click.echo(f"samples_to_threshold: {summary['samples_to_threshold']}")
    click.echo(f"done in {time.perf_counter() - start:.0f} s; report: {out / 'report.md'}")


if __name__ == "__main__":
    main()
