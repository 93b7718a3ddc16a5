# Sourced by the scripts: make .venv (once) and install the project with the given extras.
# The peer extra pins torch==2.13.0, the CPU build pip finds on this kind of machine's disk.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
py="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$py" -m venv .venv
fi
extras="$1"
stamp=".venv/.installed-$(echo "$extras" | tr ',' '-')-$(cksum < pyproject.toml | cut -d' ' -f1)"
if [ ! -f "$stamp" ]; then
  if [ -n "$extras" ]; then target=".[${extras}]"; else target="."; fi
  echo "setting up .venv (first run: installing ${target}) ..." >&2
  log=.venv/install.log
  if ! { .venv/bin/python -m pip install --upgrade pip && .venv/bin/python -m pip install -e "$target"; } >"$log" 2>&1; then
    tail -n 30 "$log" >&2
    echo "set-up failed; the whole log is in $log" >&2
    exit 1
  fi
  touch "$stamp"
fi
