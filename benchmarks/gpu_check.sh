#!/usr/bin/env bash
# One call on a machine lent a GPU (the `device` tool): install the CUDA torch wheel, then measure the target
# forward against the GPU's own bandwidth (benchmarks/forward_roofline.py) on random-weight llama models built
# from a config (no hub download): ~1B in bf16, the three paths side by side. Writes JSON under $OUT (or
# benchmarks/results/gpu/). Budget: under 10 minutes. Nothing here has been run on a GPU yet.
#   bash benchmarks/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-benchmarks/results/gpu}"
mkdir -p "$OUT_DIR"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT_DIR/nvidia-smi.csv"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
fi
# The CUDA build of the same torch version the CPU build pins (the default wheel index carries CUDA).
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e .
.venv/bin/python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())"
# ~1.1B llama (Llama-3.2-1B shapes), random weights, bf16; decode after 256 cached tokens, verification of 1..32.
LLAMA_1B="model=tiny-random model.vocab_size=128256 model.hidden_size=2048 model.intermediate_size=8192
  model.num_layers=16 model.num_heads=32 model.num_kv_heads=8 backend=cuda backend.dtype=bfloat16"
timeout 540 .venv/bin/python benchmarks/forward_roofline.py --dtype bfloat16 --repeats 15 --sizes 1,2,4,8,16,32 \
  --paths dynamic,static,compiled --out "$OUT_DIR/forward_roofline_llama1b_bf16.json" $LLAMA_1B
