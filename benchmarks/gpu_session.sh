#!/usr/bin/env bash
# Every GPU check of the project in one batched run, for a short lease on a GPU machine (see docs/benchmarks.md):
#   OUT=gpu_out bash benchmarks/gpu_session.sh
# 1. environment (nvidia-smi, versions)  2. install with the README's command (offline from a wheelhouse .whl/
# where the machine has no index)  3. benchmark suite, ours vs transformers, bf16  4. `make test` in the
# background (CPU matrix; the GPU is busy with 5-7 meanwhile)  5. `make test-gpu`  6. `make demo` end to end, then
# the demo stopped at step 300 and resumed, and a deterministic pair, weights compared with the uninterrupted run
# 7. a BERT-base smoke run (bf16, ZeRO-1, LAMB) stopped and resumed, compared likewise.
# Logs: OUT/session.log (everything), OUT/summary.txt (one line per step), OUT/bench.md, OUT/resume.txt,
# OUT/make_test.log. BUDGET_S bounds the whole session; SECTIONS picks steps 3-7 (default "bench modernbert make-test
# test-gpu demo base"; modernbert = 3b, issue 26's floors); DRY_RUN=1 shrinks every run to check the script on a CPU.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
BUDGET=${BUDGET_S:-480}
W=${WORK_DIR:-/tmp/gpu_session}
rm -rf "$W" && mkdir -p "$W"
T0=$SECONDS
exec > >(tee -a "$OUT/session.log") 2>&1
export WANDB_MODE=offline WANDB_SILENT=true TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1 HYDRA_FULL_ERROR=1

SECTIONS=" ${SECTIONS:-bench modernbert make-test test-gpu demo base} "
want() { [[ "$SECTIONS" == *" $1 "* ]]; }
left() { echo $((BUDGET - (SECONDS - T0))); }
note() { echo "$*" | tee -a "$OUT/summary.txt"; }
run() {  # run NAME SECONDS CMD...: bounded by the session budget, logged, one summary line
  local name=$1 limit=$2 start=$SECONDS rc
  shift 2
  ((limit > $(left) - 10)) && limit=$(($(left) - 10))
  if ((limit < 15)); then note "$name: skipped (session budget spent)"; return 1; fi
  echo "===== $name ($(date -u +%H:%M:%S), limit ${limit}s): $*"
  timeout "$limit" "$@"
  rc=$?
  note "$name: rc=$rc in $((SECONDS - start))s"
  return $rc
}

# ---- 1. environment
run env 30 bash -c 'nvidia-smi; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; nproc;
  command -v python3; python3 -c "import sys, torch; print(sys.version.split()[0], torch.__version__,
  torch.version.cuda, torch.cuda.is_available() and torch.cuda.get_device_name())"; nvcc --version | tail -2;
  echo "TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-unset}"'

# ---- 2. install: the README's command (its make target), offline from .whl/ where the machine has no index
if [[ -d .whl ]]; then export PIP_NO_INDEX=1 PIP_FIND_LINKS=$PWD/.whl PIP_DISABLE_PIP_VERSION_CHECK=1; fi
if run install 240 make .venv/.installed PYTHON=python3; then
  PY=$PWD/.venv/bin/python
  TEST_GPU=(make test-gpu)
else  # fall back to the machine's python with the wheels beside it, so the GPU checks still run
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && note "install: fallback --target"
  export PYTHONPATH=/tmp/site:$PWD
  PY=$(command -v python3)
  TEST_GPU=("$PY" -m pytest -q -m gpu tests)
fi
# launch/demo.sh calls `python`: a wrapper, not a link (a linked venv python would not find its venv)
mkdir -p "$W/bin" && printf '#!/bin/sh\nexec %s "$@"\n' "$PY" > "$W/bin/python" && chmod +x "$W/bin/python"
export PATH="$W/bin:$PATH"
run versions 60 "$PY" -c "import torch, deepspeed, transformers, sys; print('python', sys.version.split()[0],
  'torch', torch.__version__, 'cuda', torch.version.cuda, 'deepspeed', deepspeed.__version__, 'transformers',
  transformers.__version__, 'device', torch.cuda.is_available() and torch.cuda.get_device_name())"

STEPS=600; HALF=300; DET=200; BASE=40
[[ "${DRY_RUN:-0}" == 1 ]] && { STEPS=20; HALF=10; DET=10; BASE=4; }

# ---- 3. benchmark suite (alone on the machine: nothing else runs while it times)
if want bench && [[ "${DRY_RUN:-0}" != 1 ]]; then
  run bench 240 bash -c "set -o pipefail; $PY benchmarks/train_step.py --suite --batch 256 --iters 10 --warmup 3 \
    | tee $OUT/bench.md; for b in 128 512; do $PY benchmarks/train_step.py --model bert-base --batch \$b --iters 10 \
    --warmup 3 | tail -2 | tee -a $OUT/bench.md; done"
fi

# ---- 3b. issue 26's floors: ModernBERT-base at 1,024 tokens and BERT-base at 128, bf16, ours vs transformers
# under the same engine (synthetic full rows; the report's last line has tokens/s, MFU and the ratio)
if want modernbert && [[ "${DRY_RUN:-0}" != 1 ]]; then
  run modernbert-bench 300 bash -c "set -o pipefail; for a in 'model=modernbert-base trainer.max_seq_length=1024 \
    trainer.micro_batch_size=32 trainer.global_batch_size=32 bench.synthetic_samples=2048' 'model=bert-base \
    trainer.max_seq_length=128 trainer.micro_batch_size=256 trainer.global_batch_size=256 \
    bench.synthetic_samples=8192'; do $PY launch/benchmark.py \$a trainer.precision=bf16 bench.compare=hf \
    bench.warmup=3 bench.steps=10 data.dir=$W/synthetic | tee -a $OUT/bench.md; done"
fi

# ---- 4. make test in the background (pytest-xdist where installed, else serial)
XDIST=$("$PY" -c "import xdist" 2>/dev/null && echo "-n 6 --dist loadfile")
TESTS=tests; [[ "${DRY_RUN:-0}" == 1 ]] && TESTS=tests/training/test_masking.py
want make-test && (timeout $(($(left) - 15)) "$PY" -m pytest -q -m "not gpu" $XDIST -p no:cacheprovider $TESTS \
  > "$OUT/make_test.log" 2>&1; echo "make test (background, $XDIST): rc=$? (124: cut at the budget)" \
  >> "$OUT/summary.txt") &
BG=$(want make-test && echo $!)

# ---- 5. the GPU test matrix
want test-gpu && run test-gpu 300 "${TEST_GPU[@]}"

# ---- 6. demo end to end, then stop + resume (default kernels, then deterministic), weights compared
compare() {  # compare LABEL RUN_A RUN_B: HF weights bitwise, and the largest difference
  "$PY" - "$@" <<'EOF' | tee -a "$OUT/resume.txt"
import json, sys
from pathlib import Path
from safetensors.torch import load_file
label, a, b = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
wa, wb = load_file(str(a / "hf" / "model.safetensors")), load_file(str(b / "hf" / "model.safetensors"))
equal = sum(bool((wa[k] == wb[k]).all()) for k in wa)
diff = max(float((wa[k].float() - wb[k].float()).abs().max()) for k in wa)
loss = lambda r: [x["loss"] for x in map(json.loads, (r / "metrics.jsonl").read_text().splitlines()) if x["kind"] == "train"]
la, lb = loss(a), loss(b)
print(f"{label}: {equal}/{len(wa)} tensors bitwise equal, max |diff| {diff:.3g}; final loss {la[-1]:.6f} vs "
      f"{lb[-1]:.6f}; loss curves equal: {la == lb}")
EOF
}
DEMO="launch/pretrain.py experiment=demo-cpu data.dir=$W/demo/data trainer.max_steps=$STEPS"
if want demo && DEMO_DIR=$W/demo run demo 240 bash launch/demo.sh trainer.max_steps=$STEPS; then  # `make demo`
  (run demo-again 120 "$PY" $DEMO run_dir=$W/again && compare "demo fp32, two uninterrupted runs" $W/demo/run $W/again) &
  P0=$!
  (run demo-stop 120 "$PY" $DEMO run_dir=$W/stop trainer.stop_at_step=$HALF && \
   run demo-resume 120 "$PY" $DEMO run_dir=$W/stop && compare "demo fp32, stop at $HALF + resume" $W/demo/run $W/stop) &
  P1=$!
  D="$DEMO trainer.deterministic=true trainer.max_steps=$DET"
  (run det-full 120 "$PY" $D run_dir=$W/det_full) &
  P2=$!
  run det-stop 120 "$PY" $D run_dir=$W/det_stop trainer.stop_at_step=$((DET / 2)) && \
    run det-resume 120 "$PY" $D run_dir=$W/det_stop
  wait $P0 $P1 $P2
  compare "demo deterministic, stop at $((DET / 2)) + resume" $W/det_full $W/det_stop

fi
if want base && [[ -d $W/demo/data ]]; then
  # ---- 7. BERT-base smoke run: bf16, ZeRO-1, LAMB, global batch 256; then alone with deterministic kernels
  B="launch/pretrain.py model=bert-base data.dir=$W/demo/data deepspeed=zero1 optim=lamb trainer.precision=bf16
     trainer.global_batch_size=256 trainer.micro_batch_size=256 trainer.max_steps=$BASE trainer.log_every=5
     trainer.eval_every=$((BASE / 2)) trainer.eval_batches=4 trainer.checkpoint_every=$((BASE / 2))
     scheduler.warmup_steps=$((BASE / 4)) optim.lr=1e-3"
  run base-full 150 "$PY" $B run_dir=$W/base_full  # alone on the GPU: its throughput is the figure
  run base-det 150 "$PY" $B run_dir=$W/base_det trainer.deterministic=true
  run base-stop 150 "$PY" $B run_dir=$W/base_stop trainer.stop_at_step=$((BASE / 2)) && \
    run base-resume 150 "$PY" $B run_dir=$W/base_stop
  compare "bert-base bf16 zero1 lamb, stop at $((BASE / 2)) + resume" $W/base_full $W/base_stop
  compare "bert-base bf16 zero1 lamb, default vs deterministic kernels" $W/base_full $W/base_det
  for r in base_full base_det; do echo "$r: $(grep -h '"kind": "train"' $W/$r/metrics.jsonl | tail -1)"; done \
    | tee -a "$OUT/resume.txt"
fi

[[ -n "$BG" ]] && wait $BG  # make test ends by itself at the budget
tail -5 "$OUT/make_test.log"
note "session: $((SECONDS - T0))s"
