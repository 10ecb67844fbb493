#!/usr/bin/env bash
# The whole GPU proof in one command (issue [gpu]): at most 8 minutes on one H200, each step time-boxed.
#
#   (a) pytest -m gpu            bf16 parity with transformers, attention paths, qmatmul, bf16 fine-tune
#   (b) scripts/benchmark.py     Llama-3.2-1B architecture, seq 2048, r16 all-linear, bf16: jaxlora
#                                against transformers + PEFT in the same run -> h200-llama-3.2-1b.json
#   (c) scripts/benchmark.py     Llama-3.1-8B architecture in int8 and nf4, jaxlora only
#                                -> h200-llama-3.1-8b-quant.json
#
# On the device machine (through the device tool), after `bash benchmarks/device_wheels.sh` here:
#   run  command: bash benchmarks/gpu_suite.sh   carry: [".whl"]   timeout_s: 540
# Logs and JSON go to $OUT, or to benchmarks/results/ when OUT is unset (run by hand).
#
#   bash benchmarks/gpu_suite.sh --smoke   the same steps on CPU with tiny presets and a handful of steps
#                                          (about a minute; CI runs it); (a) only collects the gpu tests.
#                                          Writes to $OUT, or to a temporary folder when OUT is unset.
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

PY=${PYTHON:-python3}
# Wheels the device lacks (benchmarks/device_wheels.sh), when they are missing, and the stories260K test
# model that script copies there.
if compgen -G ".whl/*.whl" >/dev/null && ! "$PY" -c "import datasets, pydantic, tensorboardX" 2>/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl || { echo "installing .whl/ failed" >&2; exit 1; }
  export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
if [[ -z "${JAXLORA_ASSETS:-}" && -d .whl/assets/models/stories260K ]]; then
  export JAXLORA_ASSETS=$ROOT/.whl/assets
fi

if ((SMOKE)); then
  export JAXLORA_ASSETS=${JAXLORA_ASSETS:-$ROOT/../shared/assets}
  export JAX_PLATFORMS=cpu CUDA_VISIBLE_DEVICES=""
  NAME_1B=smoke-tiny NAME_8B=smoke-tiny-quant
  T_TESTS=120 T_1B=150 T_8B=120
  BENCH_1B=(--preset tiny --steps 2 --warmup 1)
  BENCH_8B=(--steps 2 --warmup 1)
  QUANT=(tiny-int8 tiny-nf4)
  PYTEST=("$PY" -m pytest -m gpu --co -q -p no:cacheprovider)
else
  NAME_1B=h200-llama-3.2-1b NAME_8B=h200-llama-3.1-8b-quant
  T_TESTS=100 T_1B=160 T_8B=100
  BENCH_1B=(--preset llama-3.2-1b --steps 10 --warmup 3)
  BENCH_8B=(--steps 5 --warmup 2)
  QUANT=(llama-3.1-8b-int8 llama-3.1-8b-nf4)
  PYTEST=("$PY" -m pytest -m gpu -q -p no:cacheprovider -rA --junitxml="$DEST/pytest-junit.xml")
  # Tests share the GPU between JAX and PyTorch: JAX must not take 75% of it up front.
  export XLA_PYTHON_CLIENT_PREALLOCATE=false
fi
SUITE_LOG=$DEST/suite.txt
: >"$SUITE_LOG"
say() { echo "$*" | tee -a "$SUITE_LOG"; }
FAILED=0

# step NAME SECONDS LOG CMD...: run CMD under `timeout`, output to LOG and the console, record the result.
step() {
  local name=$1 limit=$2 log=$3
  shift 3
  say "== $name (limit ${limit}s): $*"
  local t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$log"
  local rc=${PIPESTATUS[0]} status=ok
  ((rc == 124 || rc == 137)) && status="TIMEOUT after ${limit}s"
  ((rc != 0 && rc != 124 && rc != 137)) && status="FAILED (exit $rc)"
  ((rc != 0)) && FAILED=1
  say "== $name: $status in $((SECONDS - t0))s"
}

say "gpu_suite ($([[ $SMOKE == 1 ]] && echo smoke || echo full)) $(date -u +%FT%TZ) at $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
"$PY" - <<'PY' 2>&1 | tee -a "$SUITE_LOG"
import importlib.metadata as md
import sys

import jax

print("python", sys.version.split()[0], "| jax", jax.__version__, "| backend", jax.default_backend())
print("devices:", ", ".join(f"{d.platform}:{d.device_kind}" for d in jax.devices()))
names = ["jaxlib", "flax", "optax", "transformers", "peft", "torch", "datasets", "pydantic", "numpy"]
vers = []
for n in names:
    try:
        vers.append(f"{n} {md.version(n)}")
    except md.PackageNotFoundError:
        vers.append(f"{n} MISSING")
print(" | ".join(vers))
PY
if command -v nvidia-smi >/dev/null && ((SMOKE == 0)); then
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader 2>&1 \
    | tee -a "$SUITE_LOG"
fi
say "assets: ${JAXLORA_ASSETS:-<default ../shared/assets>}; output: $DEST"

# (a) the GPU tests (smoke: collect only, so they at least import)
step "pytest -m gpu" "$T_TESTS" "$DEST/pytest.log" "${PYTEST[@]}"

# (b) Llama-3.2-1B architecture, jaxlora against transformers + PEFT in the same run
step "benchmark ${BENCH_1B[1]}" "$T_1B" "$DEST/bench-1b.log" \
  "$PY" scripts/benchmark.py "${BENCH_1B[@]}" --out "$DEST/$NAME_1B.json"

# (c) Llama-3.1-8B architecture in int8 and nf4, jaxlora only: one run each (a hang loses one), then merged
TMP_8B=$(mktemp -d)
for preset in "${QUANT[@]}"; do
  step "benchmark $preset" "$T_8B" "$DEST/bench-8b.log" \
    "$PY" scripts/benchmark.py --preset "$preset" --frameworks jaxlora "${BENCH_8B[@]}" \
    --out "$TMP_8B/$preset.json"
  cat "$DEST/bench-8b.log" >>"$TMP_8B/all.log"
done
mv "$TMP_8B/all.log" "$DEST/bench-8b.log"
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

say "files in $DEST:"
ls -1 "$DEST" | tee -a "$SUITE_LOG"
exit $FAILED
