#!/usr/bin/env bash
# Issue #6's GPU measurements, in steps that each fit one call of the workplace's device tool
# (10 minutes a command; every command below runs under `timeout`, so that a step cut short still
# brings back its log, which prints every timed round). First run on an H100 on 2026-11-23:
# docs/performance.md has those numbers and what they changed (`fl.strategy=auto` loops).
#
# Here, once per checkout (both folders are ignored through .git/info/exclude, so they travel
# only when named in the call's `carry`):
#   echo /.whl/ >> .git/info/exclude; echo /.data/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux2014_x86_64 -d .whl ml-collections==1.1.0
#   mkdir -p .data && cp ../shared/data/rfmid_dev_64px.npz .data/
# On the device (run's command; carry [".whl", ".data"]):
#   bash benchmarks/gpu_suite.sh goals   # both GPU goals in one call, for a 15-minute budget (~9 min)
#   bash benchmarks/gpu_suite.sh paper   # round time vs torch at the paper configuration (~5 min)
#   bash benchmarks/gpu_suite.sh long    # whole 100-round FedNML runs, float32 and bfloat16 (~6 min)
#   bash benchmarks/gpu_suite.sh warm    # two bfloat16 runs sharing a compilation cache (~5 min)
#   bash benchmarks/gpu_suite.sh profile # where a paper-configuration round's kernel time goes
#   bash benchmarks/gpu_suite.sh small   # round time vs torch, small CNN; run batching 1 -> 32
#   bash benchmarks/gpu_suite.sh scaling # clients 4 -> 256, loop and vmap
#   bash benchmarks/gpu_suite.sh workers # a sweep's runs in 1, 2, 4 worker processes on the GPU
#   bash benchmarks/gpu_suite.sh sweep   # the 81-run RFMiD grid of configs/sweeps/rfmid_cpu.py
# Several steps may go in one call while their sum stays under the call's 10 minutes and $OUT
# under 8 files. Since 2026-12 a session has 15 minutes of device time in all, a machine's start
# (a minute or two) included: that is one full call, so run `goals` first, with the call's
# timeout_s at 600, and anything else only with the time left after it (`status` says).
# Results land in $OUT (the tool brings them back); docs/performance.md says what each reports.
set -uo pipefail  # no -e: a step cut short by its timeout still lets the next one run
cd "$(dirname "$0")/.." || exit 1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1 FEDNML_NO_PROGRESS=1
OUT="${OUT:-/tmp/gpu_suite_out}"
mkdir -p "$OUT"

machine() {  # the GPU and the versions that ran, for docs/performance.md
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -m pip list 2>/dev/null | grep -iE "^(jax|jaxlib|flax|optax|torch) "
}

[ $# -gt 0 ] || set -- usage
for step in "$@"; do
case "$step" in
  goals)  # the two goals, most telling first, each under its own limit (sum 560 s):
    # a whole bfloat16 FedNML run (2-minute goal; 162 s before compiling ahead), FedNML's rounds
    # against the torch reference design in float32 (10x goal), the same JAX rounds in bfloat16
    machine | tee "$OUT/gpu.txt"
    timeout 200 python3 benchmarks/full_run.py --preset=paper --method=fednml --rounds=100 \
      --model_dtype=bfloat16 --out="$OUT/full_run_paper_bfloat16.json" 2>&1 \
      | tee "$OUT/full_run_paper_bfloat16.log"
    timeout 240 python3 benchmarks/round_time.py --preset=paper --rounds=2 --methods=fednml \
      --out="$OUT/round_time_paper_fednml.json" 2>&1 | tee "$OUT/round_time_paper_fednml.log"
    timeout 120 python3 benchmarks/round_time.py --preset=paper --rounds=2 --methods=fednml \
      --impls=jax --model_dtype=bfloat16 --out="$OUT/round_time_paper_fednml_bf16.json" 2>&1 \
      | tee "$OUT/round_time_paper_fednml_bf16.log"
    ;;
  paper)
    machine | tee "$OUT/gpu.txt"
    for method in fedavg fednml; do
      timeout 280 python3 benchmarks/round_time.py --preset=paper --rounds=3 --methods="$method" \
        --out="$OUT/round_time_paper_$method.json" 2>&1 | tee "$OUT/round_time_paper_$method.log"
    done
    ;;
  profile)  # kernels of a FedAvg round and of a FedNML phase-2 round, by HLO operation (~3 min)
    timeout 200 python3 benchmarks/profile_round.py --preset=paper --top=40 2>&1 \
      | tee "$OUT/profile_paper_fedavg.log"
    timeout 200 python3 benchmarks/profile_round.py --preset=paper --method=fednml --round=11 \
      --top=40 2>&1 | tee "$OUT/profile_paper_fednml_phase2.log"
    ;;
  small)
    timeout 200 python3 benchmarks/round_time.py --preset=cpu --synthetic --rounds=3 \
      --out="$OUT/round_time_small.json" 2>&1 | tee "$OUT/round_time_small.log"
    timeout 370 python3 benchmarks/run_batching.py --preset=cpu --synthetic --runs=1,2,4,8,16,32 \
      --rounds=3 --out="$OUT/run_batching_small.json" 2>&1 | tee "$OUT/run_batching.log"
    ;;
  scaling)  # the loop (auto on one GPU) and the one-program vmap, whose cost may win at many clients
    for strategy in loop vmap; do
      timeout 285 python3 benchmarks/scaling.py --clients=4,8,16,32,64,128,256 --per_client=32 \
        --strategy="$strategy" --out="$OUT/scaling_$strategy.json" 2>&1 \
        | tee "$OUT/scaling_$strategy.log"
    done
    ;;
  long)  # DTYPES="float32" (or "bfloat16") for one of the two
    for dtype in ${DTYPES:-float32 bfloat16}; do
      timeout 285 python3 benchmarks/full_run.py --preset=paper --method=fednml --rounds=100 \
        --model_dtype="$dtype" --out="$OUT/full_run_paper_$dtype.json" 2>&1 \
        | tee "$OUT/full_run_paper_$dtype.log"
    done
    ;;
  warm)  # two runs sharing a compilation cache, as a sweep's runs do: the second loads its programs
    dtype="${WARM_DTYPE:-bfloat16}"
    for i in 1 2; do
      timeout 285 python3 benchmarks/full_run.py --preset=paper --method=fednml --rounds=100 \
        --model_dtype="$dtype" --compile_cache="/tmp/xla_cache_full_run_$dtype" \
        --out="$OUT/full_run_paper_${dtype}_cache$i.json" 2>&1 \
        | tee "$OUT/full_run_paper_${dtype}_cache$i.log"
    done
    ;;
  workers)  # 8 SmallCNN runs: one process, then 2 and 4 workers sharing the GPU (~4 min)
    timeout 560 python3 benchmarks/sweep_workers.py --preset=cpu --synthetic --runs=8 --rounds=5 \
      --workers=1,2,4 --out="$OUT/sweep_workers_small.json" 2>&1 | tee "$OUT/sweep_workers.log"
    ;;
  sweep)
    # Resumable: rerun the step while the machine is warm (its checkout keeps runs/).
    # Four workers share the GPU (SmallCNN runs leave it mostly idle); WORKERS=1 for one at a time.
    python3 -m fednml_jax.sweep --config=configs/sweeps/rfmid_cpu.py \
      --workdir=runs/sweep_rfmid_gpu --config.base.data.path=.data/rfmid_dev_64px.npz \
      --workers="${WORKERS:-4}" --workers_per_gpu="${WORKERS:-4}" 2>&1 | tee "$OUT/sweep.log" || true
    tar czf "$OUT/sweep_rfmid_gpu.tgz" --exclude=checkpoints --exclude=xla_cache \
      runs/sweep_rfmid_gpu
    ;;
  *)
    echo "usage: bash benchmarks/gpu_suite.sh STEP [STEP ...]; steps: goals paper long warm" \
      "profile small scaling workers sweep" >&2
    exit 2
    ;;
esac
done
