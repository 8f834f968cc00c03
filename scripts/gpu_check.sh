#!/usr/bin/env bash
# The checks that need an NVIDIA GPU, as one command of about 8 minutes (a lent GPU comes with 15 minutes in all).
#
#   here, where git is:  mkdir -p .gpu_prev && git archive 97f6248 kernels | tar -x -C .gpu_prev
#                        (the kernels before the SASS-guided change of 2026-11-29; .gpu_prev is git-ignored)
#   on the GPU machine:  OUT=/some/dir bash scripts/gpu_check.sh [.gpu_prev]
#   (through the device tool: run(command="bash scripts/gpu_check.sh .gpu_prev", carry=[".gpu_prev"], timeout_s=600);
#    $OUT is set there)
#
# 1. tests/test_kernels.py compiled for and run on the GPU (TRITON_INTERPRET=0), against the references;
# 2. tests/test_feed.py on the GPU (the synthetic set streamed to the device);
# 3. benchmarks.bench_kernels at full size (masked Adam 100x3x224x224, DBR B 256 x C 1000 / 21841, fp32 and bf16):
#    eager and compiled references, the Triton kernels and, given a previous kernels folder, the previous
#    kernels in the same run (provider triton-prev);
# 4. bench_stages' feed part: student training with the synthetic set on the GPU or streamed to it;
# BENCH_ARGS replaces --half (e.g. "--quick" for a smoke run on a CPU).
# Everything lands in $OUT (logs, the CSV, summary.txt). The machine has torch and triton but nothing can be
# installed there, so the package is put on PYTHONPATH as links instead of pip-installed.
set -uo pipefail
OUT=${OUT:-gpu_check}
PREV=${1:-}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
ROOT=$(pwd)

note() { echo "== $*" | tee -a "$OUT/summary.txt"; }

{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  python3 -c "import sys, torch, triton; print(sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
} 2>&1 | tee "$OUT/gpu.txt"

# nrrdd and nrrdd.kernels (the folder kernels/) as a package, by links
SITE=$(mktemp -d)
mkdir -p "$SITE/nrrdd"
for f in "$ROOT"/nrrdd/*.py; do ln -s "$f" "$SITE/nrrdd/"; done
ln -s "$ROOT/kernels" "$SITE/nrrdd/kernels"
export PYTHONPATH="$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
python3 -c "import nrrdd.kernels, nrrdd.cli" || { note "nrrdd does not import"; exit 1; }

t0=$SECONDS
TRITON_INTERPRET=0 timeout 300 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py 2>&1 \
  | tee "$OUT/test_kernels.log" | tail -15
note "test_kernels on the GPU: exit ${PIPESTATUS[0]} in $((SECONDS - t0)) s: $(tail -1 "$OUT/test_kernels.log")"

# the synthetic set streamed from host memory (pinned memory, a copy stream, events): the same batches, labels and
# student as with the set on the device, and never the set on the device (needs torchvision there)
t0=$SECONDS
if python3 -c "import torchvision, nrrdd.feed, nrrdd.train, nrrdd.relabel" 2>"$OUT/test_feed.log"; then
  timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_feed.py 2>&1 | tee "$OUT/test_feed.log" | tail -8
  note "test_feed on the GPU: exit ${PIPESTATUS[0]} in $((SECONDS - t0)) s: $(tail -1 "$OUT/test_feed.log")"
else
  note "test_feed not run: $(tail -1 "$OUT/test_feed.log")"
fi

t0=$SECONDS
timeout 330 python3 -m benchmarks.bench_kernels ${BENCH_ARGS:---half} --out "$OUT/kernels_cuda.csv" \
  ${PREV:+--prev-kernels "$PREV"} 2>&1 | tee "$OUT/bench_kernels.log" | tail -45
note "bench_kernels: exit ${PIPESTATUS[0]} in $((SECONDS - t0)) s"
# last (the first thing to drop if time runs out): student training with the set on the GPU vs streamed to it,
# samples/s and peak device memory (bench_stages' feed part)
t0=$SECONDS
timeout 150 python3 -m benchmarks.bench_stages --repeats 1 --skip throughput memory set storage scaling \
  --out "$OUT/feed_cuda.csv" 2>&1 | tee "$OUT/bench_feed.log" | tail -6
note "bench_stages feed: exit ${PIPESTATUS[0]} in $((SECONDS - t0)) s"
cat "$OUT/summary.txt"
