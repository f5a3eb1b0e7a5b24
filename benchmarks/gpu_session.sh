#!/usr/bin/env bash
# Every GPU measurement (KV-cache and MLA decode attention, linear kernels, end-to-end decode,
# calibrate-target) in one call on a CUDA machine. Usage:
#   OUT=results/ bash benchmarks/gpu_session.sh [step ...]
# No argument runs every step; names pick steps, the decode-attention ones first when time is
# short: `kv_attention mla_decode` (~4 min), then `kernels calibrate_target e2e_decode`
# (~9 min), then `attention_steps` (~3 min). Results land in $OUT: one JSON and one log per
# step. Each step has its own time limit so that one slow step cannot eat the others; a step
# that fails or times out is logged and the next one runs. Nothing is fetched: slimfx is
# imported from this checkout (PYTHONPATH), never installed from an index.
set -u
OUT="${OUT:-/tmp/slimfx_gpu}"
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
PY="${PY:-python3}"  # the device image's python3 holds PyTorch
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
$PY -c "import torch, triton, transformers, slimfx; print(torch.__version__, triton.__version__, \
transformers.__version__, torch.cuda.get_device_name(0))" | tee "$OUT/versions.txt"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv >> "$OUT/versions.txt" 2>&1

WANTED=" $* "
step() {  # step NAME SECONDS COMMAND... (skipped when steps were named and NAME is not one)
    local name=$1 secs=$2
    shift 2
    if [[ $WANTED != "  " && $WANTED != *" $name "* ]]; then return 0; fi
    echo "== $name (limit ${secs}s)"
    local t0=$SECONDS
    timeout "$secs" "$@" > "$OUT/$name.log" 2>&1
    echo "   rc=$? in $((SECONDS - t0)) s; tail:"
    tail -n 25 "$OUT/$name.log"
}

# Decode attention over the int4 KV cache (Triton, fused dequant) vs SDPA over bf16, contexts
# 1k-32k, batch 1 and 8
step kv_attention 90 $PY benchmarks/kv_attention.py --json "$OUT/kv_attention.json"
# MLA decode attention over the latent cache (bf16 and int8 latent) vs SDPA over the GQA cache
# and vs the int4 KV kernel, Llama-3-8B attention shape converted at 1/4 of the cache, contexts
# 1k–32k, batch 1 and 8
step mla_decode 90 $PY benchmarks/mla_decode.py --json "$OUT/mla_decode.json"
# the second call (about 9 minutes are left after the machine's start and the first call):
# kernels 150 s, calibrate_target 70 s, e2e_decode last and trimmed to 3 runs, 250 s
step kernels 150 $PY benchmarks/kernels.py --json "$OUT/kernels.json"
# Triton-lowered forms of the e2e model's block shapes (q/o, k/v, gate/up, down); the cache is
# saved after each shape, so a cut-short step still brings back what it measured
step calibrate_target 70 $PY -m slimfx.cli calibrate-target --backend triton --target h100 \
    --device cuda --shapes 2048x2048,2048x512,2048x8192,8192x2048 --quiet \
    --out "$OUT/target_h100.json"
step e2e_decode 250 $PY benchmarks/e2e_decode.py --runs 3 --json "$OUT/e2e_decode.json"
# a third call if time is left: every default KV-cache / MLA form's decode-attention step
# (the fused kernels) timed at 1k/2k/4k/8k/16k tokens, and the 2k / 8k steps priced from the
# 1k / 4k / 16k ones (what `calibrate-target --attention` stores) against the h100 roofline
step attention_steps 180 $PY benchmarks/attention_steps.py --device cuda --target h100 \
    --json "$OUT/attention_steps.json"
