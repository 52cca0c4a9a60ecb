#!/usr/bin/env bash
# Issue #6's GPU measurements, in steps that each fit one call of the workplace's device tool
# (10 minutes a command). Not yet run on a GPU: no session so far has been lent one.
#
# Here, once per checkout (both folders are ignored through .git/info/exclude, so they travel
# only when named in the call's `carry`):
#   echo /.whl/ >> .git/info/exclude; echo /.data/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux2014_x86_64 -d .whl ml-collections==1.1.0
#   mkdir -p .data && cp ../shared/data/rfmid_dev_64px.npz .data/
# On the device (run's command; carry [".whl", ".data"]):
#   bash benchmarks/gpu_suite.sh paper   # round time vs torch at the paper configuration
#   bash benchmarks/gpu_suite.sh small   # round time vs torch, small CNN; run batching 1 -> 32
#   bash benchmarks/gpu_suite.sh scaling # clients 4 -> 256
#   bash benchmarks/gpu_suite.sh long [bfloat16]  # a whole 100-round FedNML run, paper configuration
#   bash benchmarks/gpu_suite.sh sweep   # the 81-run RFMiD grid of configs/sweeps/rfmid_cpu.py
# One step per call (each should take well under the 10-minute limit; the machine stays warm for
# a few seconds between calls, so make them back to back). `paper`, then `long`, matter most.
# Results land in $OUT (the tool brings them back); docs/performance.md says what each reports.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1 FEDNML_NO_PROGRESS=1
OUT="${OUT:-/tmp/gpu_suite_out}"
mkdir -p "$OUT"

case "${1:-}" in
  paper)
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
    python3 benchmarks/round_time.py --preset=paper --rounds=3 \
      --out="$OUT/round_time_paper.json" 2>&1 | tee "$OUT/round_time_paper.log"
    ;;
  small)
    python3 benchmarks/round_time.py --preset=cpu --synthetic --rounds=3 \
      --out="$OUT/round_time_small.json" 2>&1 | tee "$OUT/round_time_small.log"
    python3 benchmarks/run_batching.py --preset=cpu --synthetic --runs=1,2,4,8,16,32 \
      --rounds=3 --out="$OUT/run_batching_small.json" 2>&1 | tee "$OUT/run_batching.log"
    ;;
  scaling)
    python3 benchmarks/scaling.py --clients=4,8,16,32,64,128,256 --per_client=32 \
      --out="$OUT/scaling.json" 2>&1 | tee "$OUT/scaling.log"
    ;;
  long)  # optional second argument: the JAX model's dtype (float32, or bfloat16 for mixed precision)
    dtype="${2:-float32}"
    python3 benchmarks/full_run.py --preset=paper --method=fednml --rounds=100 \
      --model_dtype="$dtype" --out="$OUT/full_run_paper_$dtype.json" 2>&1 \
      | tee "$OUT/full_run_paper_$dtype.log"
    ;;
  sweep)
    # Resumable: rerun the step while the machine is warm (its checkout keeps runs/).
    python3 -m fednml_jax.sweep --config=configs/sweeps/rfmid_cpu.py \
      --workdir=runs/sweep_rfmid_gpu --config.base.data.path=.data/rfmid_dev_64px.npz \
      2>&1 | tee "$OUT/sweep.log" || true
    tar czf "$OUT/sweep_rfmid_gpu.tgz" --exclude=checkpoints --exclude=xla_cache \
      runs/sweep_rfmid_gpu
    ;;
  *)
    echo "usage: bash benchmarks/gpu_suite.sh paper|small|scaling|long|sweep" >&2
    exit 2
    ;;
esac
