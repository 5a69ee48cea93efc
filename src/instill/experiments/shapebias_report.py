"""Tables, summary, plots, example grids and report.md of a shape-bias run."""

from __future__ import annotations

import csv
import io
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from instill.runio import RunDir, atomic_path, atomic_write_text, to_dict, write_json

LABELS = {"subnet": "Subtask Induction", "sampled": "sampled subnetwork",
          "complement": "complement subnetwork", "full": "full model transfer",
          "random": "random init", "random_aug": "random init + shape-preserving aug",
          "random_subnet": "subnetwork of a random-init model"}

TICKS = {"subnet": "Subtask\nInduction", "sampled": "sampled\nsubnetwork",
         "complement": "complement\nsubnetwork", "full": "full model\ntransfer",
         "random": "random\ninit", "random_aug": "random init\n+ shape aug",
         "random_subnet": "random-init\nsubnetwork"}

#: Shape-bias anchors of Geirhos et al. (2019), drawn as reference lines.
ANCHORS = {"ImageNet ResNet-50": 0.22, "Stylized-ImageNet ResNet-50": 0.81, "humans": 0.96}

METRICS = ("shape_bias", "natural_accuracy", "shape_only_accuracy")
CSV_KEYS = ["arch", "n", "seed", "condition", "shape_bias", "natural_accuracy",
            "shape_only_accuracy", "shape_hits", "texture_hits", "other", "cue_conflict_n",
            "val_accuracy", "best_epoch", "epochs"]  # wall times stay in cells/*.json


def _mean(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return statistics.fmean(kept) if kept else None


def _conditions(cfg, rows: list[dict]) -> list[str]:
    """The configured conditions that have results (a condition may have been skipped)."""
    present = {r["condition"] for r in rows}
    return [c for c in cfg.conditions if c in present]


def summarize(cfg, rows: list[dict], verify: dict, base: dict, data_info: dict,
              notes: dict[str, str] | None = None) -> dict[str, Any]:
    """summary.json: each metric per condition, mean over seeds, per n and over the grid."""
    groups: dict[tuple[str, int], list[dict]] = defaultdict(list)
    for row in rows:
        groups[row["condition"], row["n"]].append(row)
    by_condition: dict[str, Any] = {}
    for condition in _conditions(cfg, rows):
        mine = [r for r in rows if r["condition"] == condition]
        per_n = {}
        for n in sorted({r["n"] for r in mine}):
            group = groups[condition, n]
            per_n[str(n)] = {m: _mean([r[m] for r in group]) for m in METRICS}
            per_n[str(n)]["seeds"] = len(group)
            biases = [r["shape_bias"] for r in group if r["shape_bias"] is not None]
            per_n[str(n)]["shape_bias_range"] = [min(biases), max(biases)] if biases else None
        by_condition[condition] = {
            **{m: _mean([per_n[k][m] for k in per_n]) for m in METRICS}, "per_n": per_n}
    summary = {
        "arch": cfg.arch,
        "grid": list(cfg.grid),
        "seeds": cfg.seeds,
        "conditions": _conditions(cfg, rows),
        "base_model": {m: base.get(m) for m in METRICS},
        "subnetwork_density": {k: v["density"] for k, v in verify.items()},
        "by_condition": by_condition,
        "anchors": ANCHORS,
        "data": data_info,
        "notes": notes or {},
    }
    summary["paired"] = paired(rows)
    summary["headline"] = headline(cfg, summary)
    return summary


def paired(rows: list[dict]) -> dict[str, int]:
    """In how many cells (n, seed) Subtask Induction's shape bias beats random init's."""
    bias = {(r["condition"], r["n"], r["seed"]): r["shape_bias"] for r in rows}
    cells = [(n, seed) for c, n, seed in bias if c == "subnet"
             and bias.get(("random", n, seed)) is not None and bias[c, n, seed] is not None]
    return {"pairs": len(cells),
            "subnet_higher": sum(bias["subnet", *k] > bias["random", *k] for k in cells)}


def headline(cfg, summary: dict) -> str:
    """The result in one sentence, saying plainly when Subtask Induction did not help."""
    by = summary["by_condition"]
    if "subnet" not in by or "random" not in by:
        return (f"{cfg.arch}: shape bias by condition (mean over the grid and seeds): "
                + ", ".join(f"{c} {_f(v['shape_bias'])}" for c, v in by.items()) + ".")
    s, r = by["subnet"], by["random"]
    wins, pairs = summary["paired"]["subnet_higher"], summary["paired"]["pairs"]
    over = (f"{cfg.arch}, mean over n in {list(cfg.grid)} and {cfg.seeds} seed(s); higher in "
            f"{wins} of {pairs} paired runs")
    others = [f"{LABELS[c]} {_f(by[c]['shape_bias'])}" for c in ("random_aug", "random_subnet",
                                                                 "full") if c in by]
    others.append(f"base model {_f(summary['base_model']['shape_bias'])}")
    accuracy = (f"natural accuracy {_f(s['natural_accuracy'])} vs "
                f"{_f(r['natural_accuracy'])}")
    # Paired over the cells (same data, same fresh weights): only a consistent gain counts.
    verb = ("raised" if pairs and wins == pairs else
            "did not raise" if wins == 0 else "did not consistently raise")
    return (f"Subtask Induction {verb} the shape bias on cue-conflict images: "
            f"{_f(s['shape_bias'])} against {_f(r['shape_bias'])} for training from a random "
            f"init ({over}; {accuracy}; {'; '.join(others)}).")


def _f(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def write_csv(run: RunDir, cfg, rows: list[dict]) -> None:
    order = {c: i for i, c in enumerate(cfg.conditions)}
    rows = sorted(rows, key=lambda r: (r["n"], r["seed"], order[r["condition"]]))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_KEYS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{row[k]:.6f}" if isinstance(row[k], float) else
                             "" if row[k] is None else row[k]) for k in CSV_KEYS})
    atomic_write_text(run.path("results.csv"), buffer.getvalue())


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)


def plot(run: RunDir, cfg, rows: list[dict], summary: dict) -> None:
    """shape_bias.png: shape bias per condition (bars per n, range over seeds) with Geirhos et
    al.'s anchors; accuracy on held-out natural (solid) and shape_only (dashed) against n."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    conditions, ns = summary["conditions"], sorted({r["n"] for r in rows})
    by = summary["by_condition"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(14, 5), gridspec_kw={"width_ratios": [3, 2]})
    width = 0.8 / max(len(ns), 1)
    for i, n in enumerate(ns):
        xs, heights, lows, highs = [], [], [], []
        for j, c in enumerate(conditions):
            stats = by[c]["per_n"].get(str(n))
            if not stats or stats["shape_bias"] is None:
                continue
            xs.append(j + (i - (len(ns) - 1) / 2) * width)
            heights.append(stats["shape_bias"])
            lo, hi = stats["shape_bias_range"]
            lows.append(stats["shape_bias"] - lo)
            highs.append(hi - stats["shape_bias"])
        left.bar(xs, heights, width, yerr=[lows, highs], capsize=2, label=f"n={n}")
    styles = iter(["-.", "--", ":"])
    for label, value in ANCHORS.items():
        left.axhline(value, color="grey", lw=0.9, ls=next(styles))
        left.text(len(conditions) - 0.45, value + 0.01, f"{label} {value}", fontsize=7,
                  ha="right", color="dimgrey")
    if summary["base_model"]["shape_bias"] is not None:
        left.axhline(summary["base_model"]["shape_bias"], color="black", lw=1.2)
        left.text(-0.45, summary["base_model"]["shape_bias"] + 0.01,
                  f"base model {summary['base_model']['shape_bias']:.2f}", fontsize=7)
    left.set_xticks(range(len(conditions)), [TICKS[c] for c in conditions], fontsize=8)
    left.set(ylabel="shape bias  shape / (shape + texture)", ylim=(0, 1.05),
             title=f"Shape bias on cue-conflict images ({cfg.arch}; bars: mean over seeds, "
                   "whiskers: range)")
    left.legend(fontsize=8, loc="upper left", bbox_to_anchor=(0.0, 0.93))
    for c in conditions:
        per_n = by[c]["per_n"]
        xs = [n for n in ns if str(n) in per_n]
        line = right.plot(xs, [per_n[str(n)]["natural_accuracy"] for n in xs], marker="o",
                          label=LABELS[c])[0]
        right.plot(xs, [per_n[str(n)]["shape_only_accuracy"] for n in xs], marker=".",
                   ls="--", color=line.get_color(), alpha=0.7)
    right.set_xscale("log")
    right.set_xticks(ns, [str(n) for n in ns])
    right.minorticks_off()
    right.set(xlabel="downstream natural images n", ylabel="accuracy", ylim=(0, 1.02),
              title="Accuracy: held-out natural (solid), shape_only (dashed)")
    right.legend(fontsize=7, loc="center right")
    fig.tight_layout()
    _save(fig, run.path("shape_bias.png"))


def _image_grid(path: Path, rows: list[tuple[str, torch.Tensor, list[str]]],
                title: str) -> None:
    """A PNG with one row of images per (label, images [k, 3, S, S], titles)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = max(len(images) for _, images, _ in rows)
    fig, axes = plt.subplots(len(rows), cols, figsize=(1.25 * cols + 0.6, 1.45 * len(rows)),
                             squeeze=False)
    for r, (label, images, titles) in enumerate(rows):
        for c in range(cols):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c < len(images):
                ax.imshow(images[c].permute(1, 2, 0).clamp(0, 1).numpy(),
                          interpolation="nearest")
                ax.set_title(titles[c], fontsize=7)
            else:
                ax.axis("off")
            if c == 0:
                ax.set_ylabel(label, fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    _save(fig, path)


def write_examples(run: RunDir, cfg, data) -> list[str]:
    """examples.png (preview_grid for the generated world, else the real sets) and
    augmentation.png (natural images and their `random_aug` augmentations)."""
    from instill.experiments.shapebias import shape_preserving_augment
    from instill.tasks.shapes import preview_grid

    k = 8
    if all(v is None for v in (cfg.train_dir, cfg.shape_dir, cfg.cue_conflict_dir)):
        preview_grid(cfg.world, cfg.seed, run.path("examples.png"), per_split=k)
    else:
        def row(label: str, s) -> tuple[str, torch.Tensor, list[str]]:
            idx = list(range(min(k, len(s))))
            names = s.class_names
            titles = [names[int(s.shapes[i])] if int(s.shapes[i]) == int(s.textures[i]) else
                      f"{names[int(s.shapes[i])]}/{names[int(s.textures[i])]}" for i in idx]
            return label, s.images[idx], titles

        _image_grid(run.path("examples.png"),
                    [row("natural", data.test), row("shape_only", data.shape_eval),
                     row("cue_conflict", data.cue_conflict)],
                    "Evaluation images (shape/texture where they differ)")
    images = data.test.images[:k]
    augmented = [shape_preserving_augment(images, torch.Generator().manual_seed(i), cfg.augment)
                 for i in range(2)]
    names = [data.class_names[int(i)] for i in data.test.labels[:k]]
    _image_grid(run.path("augmentation.png"),
                [("natural", images, names), *[(f"augmented {i + 1}", a, names)
                                               for i, a in enumerate(augmented)]],
                "random_aug: shape-preserving augmentation (colour permutation/inversion, "
                "grayscale, blur, noise)")
    return ["examples.png", "augmentation.png"]


def _flatten(data: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def markdown(cfg, summary: dict, verify: dict, base: dict) -> str:
    """report.md: setup, base model, verification, results, headline."""
    from instill.experiments.shapebias import ShapeBiasConfig

    paper, ours = _flatten(to_dict(ShapeBiasConfig())), _flatten(to_dict(cfg))
    unused = "vit." if cfg.arch == "resnet" else "resnet."
    differs = [f"`{k}`: {ours[k]} (paper preset: {paper[k]})" for k in paper
               if ours[k] != paper[k] and k != "seed" and not k.startswith(unused)]
    data = summary["data"]
    model = cfg.resnet if cfg.arch == "resnet" else cfg.vit
    verify_rows = []
    for source, v in verify.items():
        for label, acc in v["accuracy"].items():
            verify_rows.append([source, label, _f(acc["shape_only"]), _f(acc["natural"]),
                                _f(acc["shape_bias"])])
    by, ns = summary["by_condition"], [str(n) for n in summary["grid"]]
    result_rows = []
    for c in summary["conditions"]:
        cells = []
        for n in ns:
            st = by[c]["per_n"].get(n)
            cells.append("-" if st is None else
                         f"{_f(st['shape_bias'])} / {_f(st['natural_accuracy'])} / "
                         f"{_f(st['shape_only_accuracy'])}")
        result_rows.append([LABELS[c], *cells, _f(by[c]["shape_bias"]),
                            _f(by[c]["natural_accuracy"])])
    density = ", ".join(f"{k} {v:.4f}" for k, v in summary["subnetwork_density"].items())
    notes = summary["notes"]
    return "\n\n".join([
        f"# Subtask Induction: shape bias ({cfg.arch})",
        f"**{summary['headline']}**",
        "## Setup",
        f"Data: {data['sources']['natural']} for natural images (label = shape; texture agrees "
        f"with probability rho = {cfg.rho} in the generated world); shape-only images: "
        f"{data['sources']['shape_only']}; cue-conflict images: "
        f"{data['sources']['cue_conflict']}. Classes ({len(data['classes'])}): "
        f"{', '.join(data['classes'])}. Set sizes: "
        + ", ".join(f"{k} {v}" for k, v in data["sizes"].items()) + ".",
        f"Model: HF {cfg.arch} {to_dict(model)}, {base.get('parameters', '?')} parameters, "
        f"{cfg.size}x{cfg.size} images. Conditions: {', '.join(cfg.conditions)}; "
        f"downstream sizes n = {list(cfg.grid)}, {cfg.seeds} seed(s); each cell trains every "
        f"condition on the same images for max({cfg.induction_fit.epochs}, "
        f"ceil({cfg.induction_min_examples} / n)) epochs and keeps the epoch with the best "
        "natural validation accuracy.",
        "Settings that differ from the paper preset:\n\n"
        + ("\n".join(f"- {d}" for d in differs) or "- none"),
        "## Base model",
        _table(["natural accuracy", "shape_only accuracy", "shape bias", "best epoch"],
               [[_f(base.get("natural_accuracy")), _f(base.get("shape_only_accuracy")),
                 _f(base.get("shape_bias")), base.get("best_epoch")]]),
        "## Verification of the shape subnetwork",
        f"Density (kept fraction of the masked weights): {density}. `trained` is the subnetwork "
        "of the base model; `random_init` the one found with the same settings in a randomly "
        "initialized model.",
        _table(["source", "model", "shape_only accuracy", "natural accuracy", "shape bias"],
               verify_rows),
        "## Induction results",
        "![shape bias](shape_bias.png)",
        "Each cell: shape bias / natural accuracy / shape_only accuracy, mean over seeds.",
        _table(["condition", *[f"n={n}" for n in ns], "shape bias (mean)",
                "natural acc. (mean)"], result_rows),
        "A model at chance level scores a shape bias near 0.5 (it hits shape and texture "
        "equally rarely), so read shape bias together with accuracy. Reference shape biases "
        "(Geirhos et al. 2019): "
        + ", ".join(f"{k} {v}" for k, v in ANCHORS.items()) + ".",
        ("Notes: " + "; ".join(f"{k}: {v}" for k, v in notes.items())) if notes else "",
        "## Examples",
        "![examples](examples.png)\n\n![augmentation](augmentation.png)",
    ]).replace("\n\n\n\n", "\n\n") + "\n"


def write_report(run: RunDir, cfg, rows: list[dict], verify: dict, base: dict,
                 data) -> dict[str, Any]:
    """Write results.csv, summary.json, shape_bias.png, examples, report.md; return the
    summary."""
    import json

    notes: dict[str, str] = {}
    for path in sorted(run.path("cells").glob("*.json")):
        notes.update(json.loads(path.read_text()).get("notes", {}))
    write_csv(run, cfg, rows)
    summary = summarize(cfg, rows, verify, base, data.describe(), notes)
    write_json(run.path("summary.json"), summary)
    plot(run, cfg, rows, summary)
    examples = write_examples(run, cfg, data)
    atomic_write_text(run.path("report.md"), markdown(cfg, summary, verify, base))
    run.record_outputs(["results.csv", "summary.json", "shape_bias.png", "report.md",
                        "verify.json", *examples])
    return summary
