"""Machine facts the benchmarks print next to their figures (imported as a sibling script)."""

from __future__ import annotations

import datetime
import os
import platform
from typing import Any

import torch


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, else what `platform` knows."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> list[float]:
    """1, 5 and 15 minute load averages (empty where the OS has none)."""
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else []


def machine_facts(**extra: Any) -> dict[str, Any]:
    """Date, usable CPUs, CPU model, Python and torch versions, `extra` (e.g. thread counts)
    and the load average, in the order the benchmarks print them."""
    nproc = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "nproc": nproc, "cpu": cpu_model(), "python": platform.python_version(),
            "torch": torch.__version__, **extra, "load_average": load_average()}
