#!/usr/bin/env bash
# The one command for a session lent a GPU: build the CUDA extension, check every backend
# (capsrouting.info), run the whole test suite on CUDA, run the benchmark report. Files land
# in $CAPSROUTING_RESULTS_DIR (default bench/results/) as <device>-<date>-*. Every stage
# runs even when an earlier one failed; the script exits non-zero if any stage failed.
# Without a GPU the CUDA parts are skipped, with the reason, and the script exits 0.
#
#   bash bench/gpu_suite.sh            (from the repository root, torch with CUDA installed)
set -uo pipefail
cd "$(dirname "$0")/.."

if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_suite: skipped: no CUDA device visible to torch ($(python -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda)'))"
    exit 0
fi

results="${CAPSROUTING_RESULTS_DIR:-bench/results}"
device=$(python -c "import re, torch; print(re.sub(r'[^a-z0-9]+', '-', torch.cuda.get_device_name().lower()).strip('-'))")
stamp="${results}/${device}-$(date +%F)"
mkdir -p "${results}"
failed=()

# stage NAME LOG COMMAND...: runs COMMAND, its output shown and kept in LOG; a failure is recorded.
stage() {
    local name=$1 log=$2
    shift 2
    echo "== ${name}"
    "$@" 2>&1 | tee "${log}"
    local rc=${PIPESTATUS[0]}
    if [ "${rc}" -ne 0 ]; then
        echo "gpu_suite: stage '${name}' failed (exit ${rc}); log: ${log}"
        failed+=("${name}")
    fi
}

stage "build the extension with its CUDA kernels" "${stamp}-build.log" \
    env FORCE_CUDA=1 pip install --no-build-isolation --no-deps -e .
stage "capsrouting.info" "${stamp}-info.txt" python -m capsrouting.info
stage "test suite on CUDA" "${stamp}-tests.txt" python -m pytest -ra
stage "benchmark report" "${stamp}-report.log" python -m bench.report --out-dir "${results}"

if [ "${#failed[@]}" -ne 0 ]; then
    echo "gpu_suite: FAILED stages: ${failed[*]}; files: ${stamp}*"
    exit 1
fi
echo "gpu_suite: all stages passed; files: ${stamp}*"
