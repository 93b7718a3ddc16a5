# Sourced by the scripts: make .venv (once) and install the project with the given extras.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
py="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$py" -m venv .venv
fi
extras="$1"
stamp=".venv/.installed-$(echo "$extras" | tr ',' '-')-$(cat pyproject.toml | cksum | cut -d' ' -f1)"
if [ ! -f "$stamp" ]; then
  .venv/bin/python -m pip install --quiet --upgrade pip >/dev/null
  # torch from the CPU build (the peer extra pins the version pip finds on this machine's disk)
  if [ -n "$extras" ]; then target=".[${extras}]"; else target="."; fi
  .venv/bin/python -m pip install --quiet -e "$target"
  touch "$stamp"
fi
