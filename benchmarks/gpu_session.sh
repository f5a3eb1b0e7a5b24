#!/usr/bin/env bash
# Every GPU measurement issue 3 asks for, in one `run` call on a lent GPU machine (≤ 10 min):
#   run(command="bash benchmarks/gpu_session.sh", timeout_s=600)
# Results land in $OUT (the device tool brings them back): kernels.json / e2e_decode.json /
# target_h100.json and a log per step. Each step has its own time limit so that one slow step
# cannot eat the others; a step that fails or times out is logged and the next one runs.
set -u
OUT="${OUT:-/tmp/slimfx_gpu}"
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
pip install -q -e . --no-deps > "$OUT/install.log" 2>&1 || echo "pip install failed (see install.log)"
python -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, \
transformers.__version__, torch.cuda.get_device_name(0))" | tee "$OUT/versions.txt"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv >> "$OUT/versions.txt" 2>&1

step() {  # step NAME SECONDS COMMAND...
    local name=$1 secs=$2
    shift 2
    echo "== $name (limit ${secs}s)"
    local t0=$SECONDS
    timeout "$secs" "$@" > "$OUT/$name.log" 2>&1
    echo "   rc=$? in $((SECONDS - t0)) s; tail:"
    tail -n 25 "$OUT/$name.log"
}

step kernels 170 python benchmarks/kernels.py --json "$OUT/kernels.json"
step e2e_decode 330 python benchmarks/e2e_decode.py --json "$OUT/e2e_decode.json"
# Triton-lowered forms of the e2e model's block shapes (q/o, k/v, gate/up, down); the cache is
# saved after each shape, so a cut-short step still brings back what it measured
step calibrate_target 70 python -m slimfx.cli calibrate-target --backend triton --target h100 \
    --device cuda --shapes 2048x2048,2048x512,2048x8192,8192x2048 --quiet \
    --out "$OUT/target_h100.json"
# MLA decode attention over the latent cache (bf16 and int8 latent) vs SDPA over the GQA cache,
# Llama-3-8B attention shape converted at 1/4 of the cache, contexts 1k–32k, batch 1 and 8
step mla_decode 60 python benchmarks/mla_decode.py --json "$OUT/mla_decode.json"
