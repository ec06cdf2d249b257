#!/usr/bin/env bash
# One prepared run for the day a GPU is lent: the GPU-only tests, then bench/step.py,
# bench/ttft.py and bench/kernels.py. Each bench writes its JSON under bench/results/ with
# the device's name in the file name (step-<gpu>.json, ttft-<gpu>.json, kernels-<gpu>.json);
# this script also writes bench/results/gpu-check-<gpu>.txt (device, versions, test
# summary) and copies everything to $OUT when that is set. Budget: about 8 minutes on a
# recent data-centre GPU; each part has its own time limit so one hang cannot eat the rest.
#
# Run from the repository root: bash bench/gpu_check.sh
set -uo pipefail
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
export PYTHONPATH=${PYTHONPATH:-.}

if ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "no CUDA device visible to torch: nothing to check here" >&2
    exit 0
fi
SLUG=$("$PY" -c 'import re, torch; print(re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(0).lower()).strip("-"))')
mkdir -p bench/results
REPORT=bench/results/gpu-check-$SLUG.txt
LOGS=$(mktemp -d)
{
    echo "device: $("$PY" -c 'import torch; print(torch.cuda.get_device_name(0))')"
    "$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'
    "$PY" -c 'import triton; print("triton", triton.__version__)' 2>/dev/null || echo "triton: not installed"
    date -u +"run at %Y-%m-%dT%H:%M:%SZ"
} > "$REPORT"

part() {  # part <seconds> <name> <command...>: run with a limit, log its tail and status
    local limit=$1 name=$2; shift 2
    echo "== $name" | tee -a "$REPORT"
    timeout "$limit" "$@" > "$LOGS/$name.log" 2>&1
    local rc=$?
    tail -n 25 "$LOGS/$name.log" | tee -a "$REPORT"
    echo "-- $name: exit $rc" | tee -a "$REPORT"
}

# The GPU paths: graph decode vs eager, Triton kernels, the oracle on the device.
part 150 tests "$PY" -m pytest -q -p no:cacheprovider -x \
    tests/engine/test_step.py tests/engine/test_oracle.py tests/engine/test_triton_path.py \
    tests/engine/test_sampling.py tests/engine/test_sampling_outputs.py tests/kernels
part 120 step-graphs "$PY" -m bench.step --label gpu-graphs --steps 20
part 60 step-eager "$PY" -m bench.step --label gpu-eager --steps 20 --parts full --eager
part 90 ttft "$PY" -m bench.ttft
part 60 kernels "$PY" -m bench.kernels

if [ -n "${OUT:-}" ]; then
    cp bench/results/*"$SLUG"*.json "$REPORT" "$OUT"/ 2>/dev/null
    cp "$LOGS"/*.log "$OUT"/ 2>/dev/null
fi
echo "wrote $REPORT"
