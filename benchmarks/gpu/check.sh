#!/usr/bin/env bash
# The GPU check in one command: benchmarks/gpu/check.sh [--dry-run] OUT_DIR
#
# Needs only this repository on a machine with one CUDA GPU and Python 3.12 with torch,
# transformers, peft, accelerate, triton, safetensors, tensorboard, matplotlib, rich, pyyaml
# and pytest; no network. The rest (pydantic, math-verify, trl, datasets, ...) comes from the
# wheels in .gpu-wheels/ (built here by `python benchmarks/gpu/build_wheels.py`), installed with
# `pip --no-index --target .gpu-deps`. No model weights travel: the benchmarks build a
# random-initialised Qwen2.5-0.5B-shaped model from benchmarks/gpu/models/.
#
# Parts, each under its own timeout and all within CHECK_BUDGET_S (default 470 s, < 8 min):
#   deps        install the wheels if posttrain's extra imports are missing
#   env         GPU, driver, library versions -> OUT_DIR/env.json
#   model       random Qwen2.5-0.5B-shaped model directory
#   cuda_tests  pytest tests/test_cuda.py (SFT/RM/RL steps in bf16, invariances, LoRA, FSDP2 under
#               torchrun + nccl, kill -9 + resume, shared prompt, flex vs varlen, code sandbox)
#   attention   benchmarks/gpu/bench_attention.py: posttrain_varlen vs posttrain_flex, packed and shared prompt
#   sft         benchmarks/bench_sft.py --device cuda: tokens/s, peak memory, MFU vs TRL SFTTrainer (padding-free)
#   grpo        benchmarks/bench_grpo.py --device cuda: step time and its split vs TRL GRPOTrainer
# then OUT_DIR/results.json (every figure, every part's exit code and time) and results.md.
#
# --dry-run: the same script end to end on this CPU at tiny sizes (the cuda tests run on the CPU
# with POSTTRAIN_CUDA_TESTS_ON_CPU=1; the wheels are unpacked for CPython 3.12 but not imported).
set -uo pipefail

DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
OUT=${1:?usage: benchmarks/gpu/check.sh [--dry-run] OUT_DIR}
REPO=$(cd "$(dirname "$0")/../.." && pwd)
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
if [ -z "${PYTHON:-}" ]; then
  if [ "$DRY" = 1 ] && [ -x "$REPO/.venv/bin/python" ]; then PYTHON=$REPO/.venv/bin/python; else PYTHON=python3; fi
fi
BUDGET=${CHECK_BUDGET_S:-$([ "$DRY" = 1 ] && echo 1800 || echo 470)}
SCALE=$([ "$DRY" = 1 ] && echo 3 || echo 1)
START=$(date +%s)
DEADLINE=$((START + BUDGET))
WORK=$(mktemp -d "${TMPDIR:-/tmp}/posttrain-gpu-check.XXXXXX")
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$WORK/inductor}  # compiled kernels shared by all parts
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
: > "$OUT/parts.jsonl"
cd "$REPO"

# part NAME LIMIT_S COMMAND...: run under min(LIMIT_S, time left), log to OUT/NAME.log, record rc and seconds.
part() {
  local name=$1 limit=$2; shift 2
  limit=$((limit * SCALE))  # the dry run's CPU is slower than the GPU: same parts, longer limits
  local left=$((DEADLINE - $(date +%s)))
  [ "$limit" -gt "$left" ] && limit=$left
  if [ "$limit" -lt 5 ]; then
    echo "{\"part\": \"$name\", \"rc\": null, \"seconds\": 0, \"limit_s\": 0, \"skipped\": \"out of time\"}" >> "$OUT/parts.jsonl"
    echo "[$name] skipped: out of time"; return 0
  fi
  local t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  local took=$(( $(date +%s) - t0 ))
  echo "{\"part\": \"$name\", \"rc\": $rc, \"seconds\": $took, \"limit_s\": $limit}" >> "$OUT/parts.jsonl"
  echo "[$name] rc=$rc in ${took}s (limit ${limit}s; log $OUT/$name.log)"
}

install_deps() {
  local wheels=$REPO/.gpu-wheels
  if [ "$DRY" = 1 ]; then  # prove the wheels unpack for the GPU machine's Python; this CPU keeps its own
    "$PYTHON" -m pip install --no-index --no-deps --quiet --target "$WORK/deps-cp312" --python-version 3.12 \
      --implementation cp --abi cp312 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64 --only-binary=:all: "$wheels"/*.whl || return 1
  elif ! "$PYTHON" -c "import pydantic, math_verify, trl, datasets" 2>/dev/null; then
    "$PYTHON" -m pip install --no-index --no-deps --quiet --target "$REPO/.gpu-deps" "$wheels"/*.whl || return 1
  fi
  ls -la "$wheels"; du -sh "$wheels"
  "$PYTHON" -c "import posttrain.config, posttrain.train.sft, posttrain.train.rl; print('posttrain imports')"
}
if [ "$DRY" = 0 ]; then export PYTHONPATH="$REPO/.gpu-deps:$PYTHONPATH"; fi  # filled by the deps part if needed
export -f install_deps; export DRY REPO PYTHON WORK

if [ "$DRY" = 1 ]; then
  TINY=--tiny; DEVICE=cpu
  TEST_ENV="POSTTRAIN_CUDA_TESTS_ON_CPU=1"
  ATTN_ARGS="--tokens 512 --prompt 32 --group 4 --warmup 1 --repeats 2"
  SFT_ARGS="--device cpu --synthetic 12 --batch 4 --steps 3 --max-length 256 --micro-batch-tokens 256 --matmul-size 256"
  GRPO_ARGS="--device cpu --prompts 2 --group-size 2 --max-new-tokens 4 --steps 1 --accumulation 1 --micro-batch-tokens 1024"
else
  TINY=; DEVICE=cuda
  TEST_ENV="POSTTRAIN_CUDA_TESTS_ON_CPU=0"
  ATTN_ARGS="--tokens 8192 --prompt 512 --group 8 --warmup 3 --repeats 10"
  SFT_ARGS="--device cuda --synthetic 192 --batch 8 --steps 24 --max-length 4096 --micro-batch-tokens 4096 --matmul-size 8192"
  GRPO_ARGS="--device cuda --prompts 8 --group-size 8 --max-new-tokens 256 --steps 2 --accumulation 4 --micro-batch-tokens 6144"
fi

part deps 90 bash -c install_deps
part env 30 "$PYTHON" - "$OUT/env.json" <<'PY'
import json, platform, subprocess, sys
import torch, transformers
info = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
        "cuda": torch.version.cuda, "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "gpu_count": torch.cuda.device_count()}
for name in ("trl", "peft", "accelerate", "datasets", "pydantic", "triton"):
    try:
        info[name] = __import__(name).__version__
    except Exception as exc:  # recorded, not fatal: the parts that need it will say so
        info[name] = f"unavailable: {type(exc).__name__}: {exc}"
try:
    info["nvidia_smi"] = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=20).stdout
except Exception as exc:
    info["nvidia_smi"] = f"unavailable: {exc}"
open(sys.argv[1], "w").write(json.dumps(info, indent=2))
print(json.dumps({k: v for k, v in info.items() if k != "nvidia_smi"}, indent=2))
PY
part model 90 "$PYTHON" benchmarks/gpu/random_model.py qwen2.5-0.5b "$WORK/qwen2.5-0.5b" $TINY
part cuda_tests 150 env $TEST_ENV "$PYTHON" -m pytest -q tests/test_cuda.py -p no:cacheprovider \
  --junitxml="$OUT/cuda_tests.xml" --durations=15
part attention 40 "$PYTHON" benchmarks/gpu/bench_attention.py --model "$WORK/qwen2.5-0.5b" --device $DEVICE \
  $ATTN_ARGS --json "$OUT/attention.json"
part sft 130 "$PYTHON" benchmarks/bench_sft.py --model "$WORK/qwen2.5-0.5b" $SFT_ARGS --precision bf16 \
  --attn auto --trl-modes padding_free --json "$OUT/sft.json"
part grpo 130 "$PYTHON" benchmarks/bench_grpo.py --model "$WORK/qwen2.5-0.5b" $GRPO_ARGS --precision bf16 \
  --attn auto --json "$OUT/grpo.json"
"$PYTHON" benchmarks/gpu/summarize.py "$OUT" --dry-run "$DRY" --seconds $(( $(date +%s) - START ))
rc=$?
rm -rf "$WORK"
exit $rc
