#!/usr/bin/env bash
# The GPU playbook: the GPU work in stages of one command each, every one well inside the
# 10 minutes a lent GPU machine gives a command (stages, commands and runner: bench/gpu.py).
#
#   bash bench/gpu_suite.sh --dry-run [STAGE]   what each stage runs, what must travel with the
#                                               checkout ("carry"), expected minutes; needs no GPU
#   bash bench/gpu_suite.sh STAGE               run one stage; its files go to $CAPSROUTING_RESULTS_DIR
#                                               (default bench/results/); without a GPU it says so, exit 0
set -euo pipefail
cd "$(dirname "$0")/.."
# python3 is the interpreter that holds torch on the lent machines; python where there is no python3.
if command -v python3 >/dev/null 2>&1; then
    exec python3 -m bench.gpu "$@"
fi
exec python -m bench.gpu "$@"
