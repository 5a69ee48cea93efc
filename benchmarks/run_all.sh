#!/usr/bin/env bash
# Run every benchmark from the repository root with the project's virtual environment.
#
#   benchmarks/run_all.sh            # default sizes (about 15 minutes on a busy 2-CPU machine)
#   benchmarks/run_all.sh --quick    # smaller sizes (about 3 minutes)
#
# Only --quick is passed through to each script. vs_neurosurgeon.py needs the optional
# NeuroSurgeon package (`.venv/bin/pip install -e .[bench]`); without it a skip line is printed.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=.venv/bin/python
if [[ ! -x $PY ]]; then
    echo "run_all.sh: $PY not found; create the virtual environment first (scripts/setup.sh)" >&2
    exit 1
fi

quick=()
for arg in "$@"; do
    case $arg in
        --quick) quick=(--quick) ;;
        -h|--help) sed -n '2,8p' "${BASH_SOURCE[0]}"; exit 0 ;;
        *) echo "run_all.sh: unknown argument $arg (only --quick)" >&2; exit 2 ;;
    esac
done

status=0
run() {
    local name=$1
    shift
    echo "=== $name ($(date -Is), load average: $(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null))"
    if ! "$PY" "benchmarks/$name" "$@"; then
        echo "=== $name FAILED" >&2
        status=1
    fi
    echo
}

run mask_overhead.py "${quick[@]}"
if "$PY" -c "import NeuroSurgeon" 2>/dev/null; then
    run vs_neurosurgeon.py "${quick[@]}"
else
    echo "=== vs_neurosurgeon.py skipped: NeuroSurgeon is not installed (pip install -e .[bench])"
    echo
fi
run sweep_throughput.py "${quick[@]}"
exit $status
