#!/usr/bin/env bash
# The GPU check, end to end, in one device call (about 3-5 minutes; every step has a timeout and
# the whole stays under 8 minutes):
#   1. what is importable (numpy, cupy, torch, ml_dtypes, safetensors, tqdm, pytest, hypothesis);
#      anything missing is installed from wheels carried in wheels/ (no network there), into
#      /tmp/gpu_check_site, never over the image's own packages. No install of the project:
#      it runs from the checkout (PYTHONPATH=.).
#   2. nvidia-smi and the versions;
#   3. tests/gpu (cupy against numpy on identical inputs, float64 within 1e-12) -> $OUT/tests.txt;
#      on a GPU machine a run where they are skipped counts as a failure;
#   4. benchmarks/gpu_layers.py (full width, float32, cupy against torch) -> $OUT/gpu_layers.json,
#      $OUT/gpu_layers.md and $OUT/gpu_layers.log;
#   5. the short table, printed last.
# Exit status: 0 when the tests passed and every benchmark case ran; the targets are reported in
# the table, not enforced.
#
# With the device tool (one call; the image already has cupy, numpy, torch, pytest, hypothesis,
# ml_dtypes, safetensors and tqdm, so nothing needs carrying):
#     run(command="bash scripts/gpu_check.sh", timeout_s=600)
# If the image lacks a package: scripts/gpu_prepare_wheels.sh here first, then
#     run(command="bash scripts/gpu_check.sh", carry=["wheels"], timeout_s=600)
# Here, without a GPU (tests/test_benchmark_scripts.py does this):
#     OUT=out/gpu_check PYTHON=.venv/bin/python bash scripts/gpu_check.sh --cpu-dry-run
# Environment: OUT (default out/gpu_check), PYTHON (default python3), GPU_CHECK_BENCH_ARGS (extra
# arguments for the benchmark), GPU_CHECK_TEST_TIMEOUT / GPU_CHECK_BENCH_TIMEOUT (seconds).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
mode=gpu
case "${1:-}" in
  "") ;;
  --cpu-dry-run) mode=cpu ;;
  *) echo "usage: scripts/gpu_check.sh [--cpu-dry-run]" >&2; exit 2 ;;
esac
py="${PYTHON:-python3}"
out="${OUT:-out/gpu_check}"
mkdir -p "$out"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export CUPY_TF32=0  # IEEE float32 matrix products on the cupy side (the benchmark turns torch's off)
t_start=$SECONDS
say() { echo "[gpu_check +$((SECONDS - t_start))s] $*"; }
status=0

# ---- 1. packages ------------------------------------------------------------------------------
# module -> wheels that provide it and what it needs (installed only where not importable already)
missing_wheels() {
  "$py" - "$mode" <<'EOF'
import importlib.util, sys
need = {"numpy": [], "torch": [], "ml_dtypes": ["ml_dtypes"], "safetensors": ["safetensors"],
        "tqdm": ["tqdm"], "pytest": ["pytest", "iniconfig", "pluggy", "packaging", "pygments"],
        "hypothesis": ["hypothesis", "sortedcontainers"]}
if sys.argv[1] == "gpu":
    need["cupy"] = []
module_of = {"pygments": "pygments", "iniconfig": "iniconfig", "pluggy": "pluggy",
             "packaging": "packaging", "sortedcontainers": "sortedcontainers"}
have = lambda m: importlib.util.find_spec(m) is not None
for mod, wheels in need.items():
    if have(mod):
        continue
    if not wheels:
        print(f"!{mod}")  # cannot be carried: the image must have it
    for w in wheels:
        if w == wheels[0] or not have(module_of.get(w, w)):
            print(w)
EOF
}
say "python: $(command -v "$py") ($("$py" -c 'import sys; print(sys.version.split()[0])'))"
todo="$(missing_wheels)"
if [ -n "$todo" ]; then
  say "missing: $(echo "$todo" | tr '\n' ' ')"
  if echo "$todo" | grep -q '^!'; then
    echo "gpu_check: required module(s) $(echo "$todo" | grep '^!' | tr -d '!' | tr '\n' ' ')missing on this machine" >&2
    exit 1
  fi
  site=/tmp/gpu_check_site
  files=()
  for w in $todo; do
    f=$(ls wheels/"$w"-*.whl 2>/dev/null | head -n 1 || true)
    if [ -z "$f" ]; then
      echo "gpu_check: $w is missing and wheels/ holds no $w-*.whl (run scripts/gpu_prepare_wheels.sh here and carry wheels)" >&2
      exit 1
    fi
    files+=("$f")
  done
  timeout 120 "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --target "$site" "${files[@]}"
  export PYTHONPATH="$PYTHONPATH:$site"  # holds only modules the image lacks: nothing shadowed
  todo="$(missing_wheels)"
  if [ -n "$todo" ]; then
    echo "gpu_check: still missing after installing the wheels: $todo" >&2
    exit 1
  fi
fi

# ---- 2. the machine ---------------------------------------------------------------------------
set +e
{
  if [ "$mode" = gpu ]; then
    timeout 30 nvidia-smi || echo "nvidia-smi failed or is absent"
  fi
  timeout 120 "$py" - "$mode" <<'EOF'
import sys, importlib
for m in ("numpy", "cupy", "torch", "ml_dtypes", "safetensors", "tqdm", "pytest", "hypothesis"):
    try:
        mod = importlib.import_module(m)
        print(f"{m} {getattr(mod, '__version__', '?')}  ({mod.__file__})")
    except Exception as e:  # noqa: BLE001
        print(f"{m}: not importable ({type(e).__name__}: {e})")
from refimpl.backend import gpu_available
ok, why = gpu_available()
print("refimpl sees a GPU" if ok else f"refimpl sees no GPU: {why}")
if ok:
    import cupy, torch
    p = cupy.cuda.runtime.getDeviceProperties(0)
    free, total = cupy.cuda.runtime.memGetInfo()
    print(f"cupy device 0: {p['name'].decode()}, cc {p['major']}.{p['minor']}, "
          f"{total / 2**30:.1f} GiB ({free / 2**30:.1f} free), CUDA runtime "
          f"{cupy.cuda.runtime.runtimeGetVersion()}; torch cuda {torch.version.cuda}, "
          f"available {torch.cuda.is_available()}")
if sys.argv[1] == "gpu" and not ok:
    sys.exit(f"gpu_check: no usable GPU ({why})")
EOF
} 2>&1 | tee "$out/env.txt"
erc=${PIPESTATUS[0]}
set -e
if [ "$erc" -ne 0 ]; then
  echo "gpu_check: the environment check failed (see above)" >&2
  exit 1
fi

# ---- 3. tests/gpu -----------------------------------------------------------------------------
say "tests/gpu"
set +e
timeout "${GPU_CHECK_TEST_TIMEOUT:-180}" "$py" -m pytest tests/gpu -q -rs -p no:cacheprovider 2>&1 \
  | tee "$out/tests.txt"
rc=${PIPESTATUS[0]}
set -e
summary="$(tail -n 1 "$out/tests.txt")"
if [ "$rc" -ne 0 ]; then
  say "tests/gpu FAILED (exit $rc; 124 = timed out)"
  status=1
elif [ "$mode" = gpu ] && { echo "$summary" | grep -q skipped || ! echo "$summary" | grep -q passed; }; then
  say "tests/gpu did not all run on the GPU: $summary"
  status=1
fi

# ---- 4. the benchmark -------------------------------------------------------------------------
say "benchmarks/gpu_layers.py"
bench_args=()
if [ "$mode" = cpu ]; then bench_args+=(--small --cpu); fi
# shellcheck disable=SC2206  # word splitting of the extra arguments is wanted
bench_args+=(${GPU_CHECK_BENCH_ARGS:-})
set +e
timeout "${GPU_CHECK_BENCH_TIMEOUT:-300}" "$py" benchmarks/gpu_layers.py --out "$out" \
  "${bench_args[@]}" > "$out/gpu_layers.log" 2>&1
brc=$?
set -e
awk '/^## gpu_layers/ {exit} {print}' "$out/gpu_layers.log" | tail -n 60  # progress, errors
if [ "$brc" -ne 0 ]; then
  say "benchmark FAILED (exit $brc; 124 = timed out); partial results, if any, in $out/gpu_layers.json"
  status=1
fi

# ---- 5. the short table, last ----------------------------------------------------------------
echo
say "done in $((SECONDS - t_start)) s; tests: $summary; results in $out"
if [ -f "$out/gpu_layers.md" ]; then
  cat "$out/gpu_layers.md"
else
  echo "(no table: the benchmark did not finish)"
fi
exit "$status"
