#!/usr/bin/env bash
# One call on a machine lent a GPU (the `device` tool): the Triton kernels' parity tests compiled on CUDA
# (tests/kernels), then the target forward against the GPU's own bandwidth (benchmarks/forward_roofline.py) on
# random-weight llama models built from a config (no hub download): ~1B in bf16, the three paths side by side.
# Writes JSON and logs under $OUT (or benchmarks/results/gpu/). Budget: under 10 minutes. Nothing here has been
# run on a GPU yet.
#   bash benchmarks/gpu_check.sh
# The lent H200 reaches no network; its python3 holds torch 2.11 (CUDA), triton 3.6, transformers 5.17 and
# pytest, not hydra-core/omegaconf/mlflow. Set GPU_PYTHON=python3 there and carry the missing wheels as
# /work/.library/device/README.md says (pip download --no-deps ... hydra-core omegaconf antlr4-python3-runtime
# into .whl, installed with --target and PYTHONPATH); elsewhere the script builds .venv as below.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-benchmarks/results/gpu}"
mkdir -p "$OUT_DIR"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT_DIR/nvidia-smi.csv"
PY="${GPU_PYTHON:-.venv/bin/python}"
if [ -z "${GPU_PYTHON:-}" ]; then
  [ -x .venv/bin/python ] || python3 -m venv .venv
  # The CUDA build of the same torch version the CPU build pins (the default wheel index carries CUDA).
  .venv/bin/python -m pip install -q "torch==2.13.0" -e ".[test,triton]"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())"
# The kernels compiled for the GPU (TRITON_INTERPRET unset): parity with the torch references, many shapes.
timeout 150 "$PY" -m pytest -q -p no:cacheprovider tests/kernels 2>&1 | tee "$OUT_DIR/kernels_pytest.log" || true
# ~1.1B llama (Llama-3.2-1B shapes), random weights, bf16; decode after 256 cached tokens, verification of 1..32.
LLAMA_1B="model=tiny-random model.vocab_size=128256 model.hidden_size=2048 model.intermediate_size=8192
  model.num_layers=16 model.num_heads=32 model.num_kv_heads=8 backend=cuda backend.dtype=bfloat16"
timeout 360 "$PY" benchmarks/forward_roofline.py --dtype bfloat16 --repeats 15 --sizes 1,2,4,8,16,32 \
  --paths dynamic,static,compiled --out "$OUT_DIR/forward_roofline_llama1b_bf16.json" $LLAMA_1B
