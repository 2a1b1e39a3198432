#!/usr/bin/env bash
# The GPU checks in one go: the gpu-marked tests, then the throughput benchmarks on CUDA, each under its
# own time limit so that one slow step cannot starve the rest. Logs go to LOGDIR (default bench/gpu-logs);
# the exit status is 1 when any step failed. PYTHON overrides the interpreter (default: .venv's, else python3).
#
#   bash bench/gpu.sh                 # everything (~10 minutes on one H100/H200)
#   bash bench/gpu.sh tests unet      # a subset, in the order given
#
# Steps: tests, unet (training step, rcdm128 at batch 8: the fast path against eager fp32), encoders,
# features (stage one, engine=local; the Ray engine too where Ray is installed), train (stage two's data
# path against the online encoder, rcdm128), sample (sampler cost, rcdm128 in bf16).
set -u
cd "$(dirname "$0")/.."
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON; elif [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
LOGDIR=${LOGDIR:-bench/gpu-logs}
mkdir -p "$LOGDIR"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

step() {  # name, limit in seconds, command...
    local name=$1 limit=$2
    shift 2
    echo "=== $name (limit ${limit}s): $*"
    local t0=$SECONDS
    timeout "$limit" "$@" >"$LOGDIR/$name.log" 2>&1
    local rc=$?
    tail -n 25 "$LOGDIR/$name.log"
    echo "=== $name: exit $rc after $((SECONDS - t0)) s"
    [ "$rc" -eq 0 ] || failed+=("$name")
}

all=(tests unet encoders features train sample)
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=("${all[@]}")
for s in "${steps[@]}"; do  # refuse an unknown step before any step runs
    [[ " ${all[*]} " == *" $s "* ]] || { echo "unknown step '$s' (${all[*]})" >&2; exit 2; }
done
failed=()
for s in "${steps[@]}"; do
    case $s in
        tests) step tests 120 "$PY" -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py tests/test_encoders.py ;;
        unet) step unet 480 "$PY" bench/unet_step.py --device cuda --preset rcdm128 --batch 8 ;;
        encoders) step encoders 120 "$PY" bench/encoders.py --device cuda --iters 20 --warmup 5 ;;
        features) step features 180 "$PY" bench/features.py --images 2048 --batch 256 --skip-memory ;;
        train) step train 180 "$PY" bench/train.py --device cuda --model rcdm128 --encoder supervised \
            --batch 16 --steps 10 --warmup 2 --images 128 --workers 8 ;;
        sample) step sample 120 "$PY" bench/sample.py --device cuda --preset rcdm128 --precision bf16 \
            --images 16 --batch 16 --repeats 2 ;;
    esac
done
if [ ${#failed[@]} -gt 0 ]; then
    echo "failed: ${failed[*]} (logs in $LOGDIR)" >&2
    exit 1
fi
