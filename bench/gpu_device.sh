#!/usr/bin/env bash
# bench.gpu on a lent GPU machine, whose image has torch but no Ray, diffusers or pydantic and reaches
# no package index (docs/performance.md, "On a lent GPU machine"). Prepare here, once:
#   uv run python -m bench.device_env                 # .devenv/site.tar.xz, ~35 MB
#   uv run python -m bench.gpu --smoke-cpu --all      # the same code path on CPU
# then run it there through the device tool, carrying [".devenv"], with a call limit above
# BENCH_TIMEOUT_S (default 540 s):
#   bash bench/gpu_device.sh                          # = bench.gpu --all
#   bash bench/gpu_device.sh --quick --options --families pixart    # a narrower rerun
#   BENCH_MODULE=bench.linear_probe BENCH_TIMEOUT_S=200 bash bench/gpu_device.sh --device cuda \
#       --no-reference --train 640000 --dim 768 --classes 1000       # another benchmark, same set-up
# The log and this run's JSON results, finished or partial, are copied to $OUT, also when the run is
# stopped at BENCH_TIMEOUT_S.
set -u
out=${OUT:-/tmp/bench-gpu-out}
mkdir -p "$out"
started=$(mktemp)  # only this run's result files go back
pack=${BENCH_DEVENV:-.devenv/site.tar.xz}  # (another pack: the check of a py311 build here)
tar -xJf "$pack" -C /tmp || { echo "error: $pack: carry it (python -m bench.device_env)"; exit 2; }
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 RAY_ENABLE_UV_RUN_RUNTIME_ENV=0
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import sys, torch, transformers, timm, diffusers, ray; print('python', sys.version.split()[0], \
'torch', torch.__version__, 'transformers', transformers.__version__, 'timm', timm.__version__, \
'diffusers', diffusers.__version__, 'ray', ray.__version__)" || exit 2
[ $# -eq 0 ] && [ -z "${BENCH_MODULE:-}" ] && set -- --all
module=${BENCH_MODULE:-bench.gpu}
timeout --signal=INT --kill-after=20 "${BENCH_TIMEOUT_S:-540}" python3 -m "$module" "$@" 2>&1 \
    | tee "$out/${module#bench.}.log"
rc=${PIPESTATUS[0]}
find bench/results -maxdepth 1 -name '*.json' -newer "$started" -exec cp {} "$out/" \; 2>/dev/null
echo "$module exit $rc; results in $out: $(ls "$out" | tr '\n' ' ')"
exit "$rc"
