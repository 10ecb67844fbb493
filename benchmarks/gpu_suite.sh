#!/usr/bin/env bash
# The whole GPU proof in one command (issues [gpu], [device]): at most 9 minutes (540 s) of wall time on
# one H100 80 GB, wheel installation and compiles included, each step time-boxed. It fits an H200 too.
#
#   (a) pytest -m gpu            bf16 parity with transformers, attention paths, qmatmul, bf16 fine-tune
#   (b) scripts/benchmark.py     Llama-3.2-1B architecture, seq 2048, r16 all-linear, bf16: jaxlora
#                                against transformers + PEFT in the same run -> <gpu>-llama-3.2-1b.json
#   (c) scripts/benchmark.py     Llama-3.1-8B architecture in int8 and nf4, jaxlora only
#                                -> <gpu>-llama-3.1-8b-quant.json
#   (d) scripts/benchmark.py     Llama-3.2-1B, jaxlora only, every variant in one process (--features
#                                attention,remat --one-process): model.attention cudnn / xla / pallas /
#                                reference, each with packed rows off and on, and remat none / dots / full,
#                                against the default (auto, unpacked, lean). A variant that cannot run here
#                                (cuDNN with packed rows, Pallas on a JAX without its kernel) or repeats the
#                                default row is listed under "skipped" with the reason
#                                -> <gpu>-llama-3.2-1b-features.json
#   (e) benchmarks/rollout.py    GRPO rollout speed, Qwen2.5-0.5B architecture in bf16: jaxlora's compiled
#                                sampler against transformers' generate, 16 prompts x 8 completions of 128
#                                tokens, in one process -> <gpu>-rollout.json (run before (d))
#   (f) benchmarks/remat_plan.py the Llama-3.1-8B step's memory plans on this card (jaxlora plan, exact
#                                here): lean, full and offload at 8k tokens, offload at 128k and 342k, into
#                                suite.txt (run after (e), before (d), when (d) keeps its 40 s)
#
# <gpu> names the card: nvidia-smi's name, "NVIDIA H100 80GB HBM3" -> h100, "NVIDIA H200" -> h200, any
# other -> a lowercase slug of it ("NVIDIA A100-SXM4-80GB" -> a100-sxm4-80gb); JAX's device_kind without
# nvidia-smi. The batch follows the card's memory (nvidia-smi's memory.total, else JAX's bytes_limit); seq
# stays 2048, where docs/performance.md states its targets:
#
#   card memory   1B steps (b, d)   8B steps (c)
#   >= 120 GiB    batch 8           batch 4        H200 (140 GiB)
#   >= 70 GiB     batch 4           batch 4        H100 (79 GiB): PEFT's 1B step at batch 8 needs an
#                                                  estimated 60+ GB (activations, float32 logits)
#   >= 36 GiB     batch 2           batch 2
#   less          batch 1           batch 1
#
# The 8B memory targets (int8 under 16 GB, nf4 under 10 GB) are stated at the preset's batch 4, so a
# bigger card keeps it; it fits an H100 (JAX may take 75% of it, 60 GB).
#
# Time budget in seconds of wall time. The limits are hard; the H100 times are estimates from the work
# each step does (start-ups, compiles, host-side 8B weights), not measured there yet:
#
#   step                                         limit            expected on an H100
#   setup: .whl install, nvidia-smi, versions    40 + 10 + 40     20
#   (a) pytest -m gpu                            100              70
#   (b) 1B jaxlora + PEFT, 13 steps each         120              80   two processes, each starts and compiles
#   (c) 8B int8, then 8B nf4, 7 steps each       100 + 100        160  random 8B weights drawn and
#                                                                      quantized on the host first
#   (e) rollout, 0.5B, 3 timed calls per row     100 when 145     60   a 0.5B draw on the GPU, two compiles
#                                                are left
#   (f) plans, five 8B step compilations         90 when 135      60   abstract arrays: nothing is loaded
#                                                are left
#   (d) 1B features, 7 steps per variant         BUDGET (530)     135  one start-up, the model loaded once,
#                                                - elapsed - 5         ~20 s a variant (compile + steps):
#                                                                      6 to 7 of its 10 rows
#   (c)'s merge, listing                         -                2
#
# Worst case, each fixed step at its limit plus `timeout`'s 5 s of grace: 90 + 105 + 125 + 2 x 105 = 530,
# so neither (e), (f) nor (d) starts (they need 145, 135 and 40 s; the suite says so and fails) and the
# suite ends by about 532 s. (e) runs when 145 s are left: its 100, 5 of grace and the 40 (d) needs; (f)
# likewise when 135 s are left (a skipped (f) does not fail the suite). (d)'s
# limit is what is left of the 530 s less 5; inside it, benchmark.py starts no variant
# that would not end by 20 s before the limit (--time-box, counted from its own start) and stops one
# still running 2 s after that, then writes its JSON: the suite ends by 530 s plus the listing, under 540.
# (d) runs last because it degrades gracefully: it fills whatever time the fixed steps leave, row by row,
# the most telling first (auto's kernel against xla, packed rows, remat, then the rest), and rewrites its
# JSON after every row, so even a kill keeps what it measured. (a) to (c) are all or nothing.
#
# On the device machine (through the device tool), after `bash benchmarks/device_wheels.sh` here:
#   run  command: bash benchmarks/gpu_suite.sh   carry: [".whl"]   timeout_s: 540 to 560
# (b) and (c) log to bench.log, (e) to suite.txt: with pytest.log, bench-features.log and four JSON
# reports the suite writes 8 files, the most the device tool returns.
# Logs and JSON go to $OUT, or to benchmarks/results/ when OUT is unset (run by hand). GPU_SUITE_BUDGET
# (seconds, default 530) changes the budget (d) fills.
#
#   bash benchmarks/gpu_suite.sh --smoke   the same steps on CPU with tiny presets and a handful of steps
#                                          (about two minutes; CI runs it); (a) only collects the gpu
#                                          tests; files are named smoke-cpu-tiny*.json. Writes to $OUT,
#                                          or to a temporary folder when OUT is unset.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
SMOKE=0
case "${1:-}" in
  --smoke) SMOKE=1 ;;
  "") ;;
  *) echo "usage: bash benchmarks/gpu_suite.sh [--smoke]" >&2; exit 2 ;;
esac

if [[ -n "${OUT:-}" ]]; then DEST=$OUT
elif ((SMOKE)); then DEST=$(mktemp -d "${TMPDIR:-/tmp}/gpu-suite-smoke.XXXXXX")
else DEST=$ROOT/benchmarks/results; fi
mkdir -p "$DEST"
export PYTHONUNBUFFERED=1
# The project is not pip-installed on the device: the repository root goes on the path.
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
SUITE_LOG=$DEST/suite.txt
: >"$SUITE_LOG"
say() { echo "$*" | tee -a "$SUITE_LOG"; }
FAILED=0

PY=${PYTHON:-python3}
# Wheels the device lacks (benchmarks/device_wheels.sh), when they are missing, and the stories260K test
# model that script copies there.
if compgen -G ".whl/*.whl" >/dev/null && ! "$PY" -c "import datasets, pydantic, tensorboardX" 2>/dev/null; then
  timeout 40 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || { echo "installing .whl/ failed" >&2; exit 1; }
  export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
if [[ -z "${JAXLORA_ASSETS:-}" && -d .whl/assets/models/stories260K ]]; then
  export JAXLORA_ASSETS=$ROOT/.whl/assets
fi

if ((SMOKE)); then
  export JAXLORA_ASSETS=${JAXLORA_ASSETS:-$ROOT/../shared/assets}
  export JAX_PLATFORMS=cpu CUDA_VISIBLE_DEVICES=""
  BUDGET=900 FEAT_MAX=150
  PYTEST=("$PY" -m pytest -m gpu --co -q -p no:cacheprovider)
else
  BUDGET=${GPU_SUITE_BUDGET:-530} FEAT_MAX=$BUDGET
  # -rA: every test's outcome in pytest.log (no JUnit file: the device tool returns at most 8 files, and
  # the suite writes 8: suite.txt, two logs of benchmarks, pytest.log and four JSON reports)
  PYTEST=("$PY" -m pytest -m gpu -q -p no:cacheprovider -rA)
  # Tests share the GPU between JAX and PyTorch: JAX must not take 75% of it up front.
  export XLA_PYTHON_CLIENT_PREALLOCATE=false
fi

# step NAME SECONDS LOG CMD...: run CMD under `timeout`, output to LOG and the console, record the result.
step() {
  local name=$1 limit=$2 log=$3
  shift 3
  say "== $name (limit ${limit}s): $*"
  local t0=$SECONDS
  timeout --kill-after=5 "$limit" "$@" 2>&1 | tee "$log"
  local rc=${PIPESTATUS[0]} status=ok
  ((rc == 124 || rc == 137)) && status="TIMEOUT after ${limit}s"
  ((rc != 0 && rc != 124 && rc != 137)) && status="FAILED (exit $rc)"
  ((rc != 0)) && FAILED=1
  say "== $name: $status in $((SECONDS - t0))s"
}

# gpu_slug NAME: h100, h200, or a lowercase slug of the card's name (what the files are named after).
gpu_slug() {
  local s
  s=$(echo "$1" | tr '[:upper:]' '[:lower:]' | sed -E 's/^ *nvidia +//; s/[^a-z0-9]+/-/g; s/^-+|-+$//g')
  case "$s" in
    h100 | h100-*) echo h100 ;;
    h200 | h200-*) echo h200 ;;
    "") echo unknown ;;
    *) echo "$s" ;;
  esac
}

say "gpu_suite ($([[ $SMOKE == 1 ]] && echo smoke || echo full)) $(date -u +%FT%TZ) at $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
GPU_NAME="" GPU_MIB=0
if ((SMOKE == 0)) && command -v nvidia-smi >/dev/null; then
  SMI=$(timeout 10 nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm \
    --format=csv,noheader,nounits 2>&1 | head -1)
  say "nvidia-smi: name, memory MiB, driver, max SM MHz: $SMI"
  IFS=, read -r GPU_NAME GPU_MIB _ <<<"$SMI"
  GPU_MIB=${GPU_MIB//[^0-9]/}
fi
# Versions, and JAX's device (its kind and memory: the fallback without nvidia-smi) into $DEVICE_INFO.
DEVICE_INFO=$(mktemp)
timeout 40 "$PY" - "$DEVICE_INFO" <<'PY' 2>&1 | tee -a "$SUITE_LOG"
import importlib.metadata as md
import os
import sys

import jax

print("python", sys.version.split()[0], "| jax", jax.__version__, "| backend", jax.default_backend())
print("devices:", ", ".join(f"{d.platform}:{d.device_kind}" for d in jax.devices()))
names = ["jaxlib", "flax", "optax", "orbax-checkpoint", "transformers", "peft", "trl", "torch"]
names += ["datasets", "pydantic", "tensorboardX", "numpy"]
vers = []
for n in names:
    try:
        vers.append(f"{n} {md.version(n)}")
    except md.PackageNotFoundError:
        vers.append(f"{n} MISSING")
print(" | ".join(vers))
dev = jax.devices()[0]
# bytes_limit is the share JAX may take (XLA_PYTHON_CLIENT_MEM_FRACTION, 0.75 by default): about the card.
fraction = float(os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", 0.75))
card = (dev.memory_stats() or {}).get("bytes_limit", 0) / fraction
with open(sys.argv[1], "w") as f:
    f.write(f"{dev.device_kind}\t{int(card) // 2**20}\n")
PY
if [[ -z "$GPU_NAME" || -z "$GPU_MIB" ]]; then
  IFS=$'\t' read -r GPU_NAME GPU_MIB <"$DEVICE_INFO"
fi
rm -f "$DEVICE_INFO"
GPU=$(gpu_slug "${GPU_NAME:-}")
GIB=$((${GPU_MIB:-0} / 1024))

if ((SMOKE)); then
  PREFIX=smoke-$GPU
  NAME_1B=$PREFIX-tiny NAME_8B=$PREFIX-tiny-quant NAME_FEAT=$PREFIX-tiny-features
  T_TESTS=120 T_1B=150 T_8B=120
  BENCH_1B=(--preset tiny --steps 2 --warmup 1)
  BENCH_8B=(--steps 2 --warmup 1)
  BENCH_FEAT=(--preset tiny --steps 2 --warmup 1)
  QUANT=(tiny-int8 tiny-nf4)
  T_ROLL=60 ROLL=(--arch tiny --prompts 2 --generations 2 --prompt-len 8 --new-tokens 8 --repeats 2
    --rows jaxlora,transformers)
else
  if ((GIB >= 120)); then B_1B=8 B_8B=4
  elif ((GIB >= 70)); then B_1B=4 B_8B=4
  elif ((GIB >= 36)); then B_1B=2 B_8B=2
  else B_1B=1 B_8B=1; fi
  PREFIX=$GPU
  NAME_1B=$PREFIX-llama-3.2-1b NAME_8B=$PREFIX-llama-3.1-8b-quant NAME_FEAT=$PREFIX-llama-3.2-1b-features
  T_TESTS=100 T_1B=120 T_8B=100
  BENCH_1B=(--preset llama-3.2-1b --batch "$B_1B" --seq 2048 --steps 10 --warmup 3)
  BENCH_8B=(--batch "$B_8B" --seq 2048 --steps 5 --warmup 2)
  BENCH_FEAT=(--preset llama-3.2-1b --batch "$B_1B" --seq 2048 --steps 5 --warmup 2)
  QUANT=(llama-3.1-8b-int8 llama-3.1-8b-nf4)
  T_ROLL=100 ROLL=(--arch qwen2.5-0.5b --dtype bfloat16 --prompts 16 --generations 8 --prompt-len 128
    --new-tokens 128 --repeats 3 --rows jaxlora,transformers)
  T_PLAN=90 PLAN_MODEL=$ROOT/benchmarks/presets/llama-3.1-8b
fi
SIZES=$( ((SMOKE)) && echo "tiny presets" || echo "1B batch $B_1B, 8B batch $B_8B, seq 2048")
say "device: ${GPU_NAME:-?}, ${GIB} GiB -> file prefix $PREFIX, $SIZES"
say "assets: ${JAXLORA_ASSETS:-<default ../shared/assets>}; output: $DEST; setup took ${SECONDS}s"

# (a) the GPU tests (smoke: collect only, so they at least import)
step "pytest -m gpu" "$T_TESTS" "$DEST/pytest.log" "${PYTEST[@]}"

# (b) Llama-3.2-1B architecture, jaxlora against transformers + PEFT in the same run
step "benchmark ${BENCH_1B[1]}" "$T_1B" "$DEST/bench.log" \
  "$PY" scripts/benchmark.py "${BENCH_1B[@]}" --out "$DEST/$NAME_1B.json"

# (c) Llama-3.1-8B architecture in int8 and nf4, jaxlora only: one run each (a hang loses one), then merged
TMP_8B=$(mktemp -d)
for preset in "${QUANT[@]}"; do
  step "benchmark $preset" "$T_8B" "$TMP_8B/step.log" \
    "$PY" scripts/benchmark.py --preset "$preset" --frameworks jaxlora "${BENCH_8B[@]}" \
    --out "$TMP_8B/$preset.json"
  cat "$TMP_8B/step.log" >>"$DEST/bench.log"
done
"$PY" - "$DEST/$NAME_8B.json" "$TMP_8B"/*.json <<'PY' 2>&1 | tee -a "$SUITE_LOG"
import json
import sys

out, parts = sys.argv[1], [p for p in sys.argv[2:] if not p.endswith("*.json")]
reports = [json.load(open(p)) for p in parts]
if not reports:
    print("no quantized benchmark report to merge")
    sys.exit(0)
merged = {
    "command": " && ".join(r["command"] for r in reports),
    "specs": [s for r in reports for s in r["specs"]],
    "runs": [run for r in reports for run in r["runs"]],
    "peaks_flops": {k: max(r["peaks_flops"].get(k, 0.0) for r in reports) for k in reports[0]["peaks_flops"]},
}
json.dump(merged, open(out, "w"), indent=1)
for run in merged["runs"]:
    r = run["results"]["jaxlora"]
    print(f"{run['spec']['name']}: {r['tokens_per_s']:.0f} tokens/s, peak {r['peak_memory_bytes'] / 2**30:.2f} GiB")
PY
rm -rf "$TMP_8B"

# (e) rollout speed, jaxlora against transformers' generate in one process; its table goes to suite.txt
LEFT=$((BUDGET - SECONDS - 5))
if ((LEFT >= T_ROLL + 45)); then
  ROLL_LOG=$(mktemp)
  step "rollout ${ROLL[1]}" "$T_ROLL" "$ROLL_LOG" "$PY" benchmarks/rollout.py "${ROLL[@]}" \
    --out "$DEST/$PREFIX-rollout.json"
  cat "$ROLL_LOG" >>"$SUITE_LOG"
  rm -f "$ROLL_LOG"
else
  say "== rollout ${ROLL[1]}: not run, ${LEFT}s left of the ${BUDGET}s budget"
  FAILED=1
fi

# (f) the memory plans of the 8B step on this card (exact here; benchmarks/remat_plan.py --gpu), into
# suite.txt: lean, full and offload at 8k, offload at 128k and 342k. Skipped when (d) would get under 40 s.
LEFT=$((BUDGET - SECONDS - 5))
if ((SMOKE)); then
  say "== plans: not run in the smoke (five 8B compilations take minutes on a CPU; docs/performance.md has them)"
elif ((LEFT >= T_PLAN + 45)); then
  PLAN_LOG=$(mktemp)
  step "plans ${PLAN_MODEL##*/}" "$T_PLAN" "$PLAN_LOG" "$PY" benchmarks/remat_plan.py --gpu \
    --model "$PLAN_MODEL" --out -
  cat "$PLAN_LOG" >>"$SUITE_LOG"
  rm -f "$PLAN_LOG"
else
  say "== plans: not run, ${LEFT}s left of the ${BUDGET}s budget"
fi

# (d) Llama-3.2-1B speed switches, jaxlora only, in one process: what is left of the budget
LEFT=$((BUDGET - SECONDS - 5))
T_FEAT=$((LEFT < FEAT_MAX ? LEFT : FEAT_MAX))
if ((T_FEAT >= 40)); then
  step "benchmark --features ${BENCH_FEAT[1]}" "$T_FEAT" "$DEST/bench-features.log" \
    "$PY" scripts/benchmark.py "${BENCH_FEAT[@]}" --features attention,remat --one-process \
    --time-box $((T_FEAT - 20)) --out "$DEST/$NAME_FEAT.json"
else
  say "== benchmark --features ${BENCH_FEAT[1]}: not run, ${LEFT}s left of the ${BUDGET}s budget"
  FAILED=1
fi

say "files in $DEST (suite took ${SECONDS}s):"
ls -1 "$DEST" | tee -a "$SUITE_LOG"
exit $FAILED
