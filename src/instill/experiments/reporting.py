"""Report pieces every experiment shares: markdown tables, the gates table, results.csv and
figures written atomically."""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from instill.storage import atomic_path, atomic_write_text


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def gate_rows(gates: dict[str, Any]) -> list[list[Any]]:
    """One row per attempt of every pipeline: its gates, and which attempt was used."""
    rows = []
    for unit, record in gates.items():
        for attempt in record["attempts"]:
            chosen = "chosen" if attempt["attempt"] == record["attempt"] else ""
            rows.append([unit, attempt["attempt"], "; ".join(
                f"{g['name']} {g['value']:.3f} ({'pass' if g['passed'] else 'FAIL'} at "
                f"{g['threshold']:g})" for g in attempt["gates"]),
                chosen + (" (overridden)" if chosen and record.get("overridden") else "")])
    return rows


def gates_table(gates: dict[str, Any]) -> str:
    return table(["pipeline", "attempt", "gates", ""], gate_rows(gates))


def write_csv(path: Path, keys: Sequence[str], rows: Sequence[dict[str, Any]]) -> None:
    """Rows as CSV with floats at 6 decimals and None as empty, written atomically."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(keys), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{row[k]:.6f}" if isinstance(row[k], float) else
                             "" if row[k] is None else row[k]) for k in keys})
    atomic_write_text(path, buffer.getvalue())


def save_figure(fig: Any, path: Path) -> None:
    """A matplotlib figure as PNG, written atomically, then closed."""
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
