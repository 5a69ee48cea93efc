#!/usr/bin/env bash
# Run every benchmark from the repository root with the project's virtual environment.
#
#   benchmarks/run_all.sh            # all five, default sizes (about an hour on 2 CPUs)
#   benchmarks/run_all.sh --quick    # smaller sizes, no end-to-end runs (about 4 minutes)
#
# --quick is passed through to each script; the end-to-end benchmark (both experiments' quick
# presets, replicated pipelines, goal <= 15 minutes each) runs only without it. NeuroSurgeon
# (`.venv/bin/pip install -e .[bench]`) is optional: without it vs_neurosurgeon.py is skipped.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
quick=()
for arg in "$@"; do
    case $arg in
        --quick) quick=(--quick) ;;
        -h|--help) sed -n "2,9p" "${BASH_SOURCE[0]}"; exit 0 ;;
        *) echo "run_all.sh: unknown argument $arg (only --quick)" >&2; exit 2 ;;
    esac
done

PY=.venv/bin/python
if [[ ! -x $PY ]]; then
    echo "run_all.sh: $PY not found; create the virtual environment first (scripts/setup.sh)" >&2
    exit 1
fi

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

run mask_overhead.py --threads 1 "${quick[@]}"
if "$PY" -c "import NeuroSurgeon" 2>/dev/null; then
    run vs_neurosurgeon.py "${quick[@]}"
else
    echo "=== vs_neurosurgeon.py skipped: NeuroSurgeon is not installed (pip install -e .[bench])"
    echo
fi
run sweep_throughput.py "${quick[@]}"
run step_anatomy.py
if [[ ${#quick[@]} -eq 0 ]]; then
    run end_to_end.py
else
    echo "=== end_to_end.py skipped with --quick (it runs both quick presets, up to ~30 minutes)"
fi
exit $status
