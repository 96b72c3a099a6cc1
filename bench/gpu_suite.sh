#!/usr/bin/env bash
# The one command for a session lent a GPU: build the CUDA extension, run the whole test
# suite on CUDA, run the benchmark report. Everything lands in bench/results/<device>-<date>.*
# Without a GPU the CUDA parts are skipped, with the reason, and the script exits 0.
#
#   bash bench/gpu_suite.sh            (from the repository root, torch with CUDA installed)
set -uo pipefail
cd "$(dirname "$0")/.."

if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_suite: skipped: no CUDA device visible to torch ($(python -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda)'))"
    exit 0
fi

device=$(python -c "import re, torch; print(re.sub(r'[^a-z0-9]+', '-', torch.cuda.get_device_name().lower()).strip('-'))")
stamp="bench/results/${device}-$(date +%F)"
mkdir -p bench/results
status=0

echo "== building the extension with its CUDA kernels" | tee "${stamp}-build.log"
FORCE_CUDA=1 pip install --no-build-isolation -e . >> "${stamp}-build.log" 2>&1 || status=1
python -m capsrouting.info 2>&1 | tee "${stamp}-info.txt"

echo "== test suite on CUDA"
python -m pytest -ra 2>&1 | tee "${stamp}-tests.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== benchmark report"
python -m bench.report 2>&1 | tee "${stamp}-report.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "gpu_suite: done (status ${status}); files: ${stamp}*"
exit "${status}"
