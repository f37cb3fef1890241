#!/usr/bin/env bash
# Creates ./.venv with a Python >= 3.12 and installs attnjax with its test,
# bench and experiment extras (jax pinned by constraints.txt). Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."

ok() { "$1" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' >/dev/null 2>&1; }

find_python() {
  local c v root
  for c in "${PYTHON:-}" python3.12 python3.13 python3.14 python3 python; do
    [ -n "$c" ] && command -v "$c" >/dev/null 2>&1 && ok "$c" && { command -v "$c"; return 0; }
  done
  # pyenv shims fail unless PYENV_VERSION names the version: ask pyenv itself.
  if command -v pyenv >/dev/null 2>&1; then
    root=$(pyenv root)
    for v in $(pyenv versions --bare 2>/dev/null | grep -E '^3\.1[2-9](\.[0-9]+)?$' | sort -V); do
      [ -x "$root/versions/$v/bin/python3" ] && ok "$root/versions/$v/bin/python3" \
        && { echo "$root/versions/$v/bin/python3"; return 0; }
    done
  fi
  for c in "$HOME"/.pyenv/versions/3.1[2-9]*/bin/python3 /usr/local/bin/python3.1[2-9] \
           /usr/bin/python3.1[2-9] /opt/python*/bin/python3; do
    [ -x "$c" ] && ok "$c" && { echo "$c"; return 0; }
  done
  return 1
}

if [ ! -x .venv/bin/python ] || ! ok .venv/bin/python; then
  py=$(find_python) || {
    echo "attnjax needs Python >= 3.12 (jax 0.11 requires it) and none was found." >&2
    echo "Install one, e.g. 'pyenv install 3.12' or 'apt-get install python3.12 python3.12-venv'," >&2
    echo "or point PYTHON=/path/to/python3.12 at it, then rerun this script." >&2
    exit 1
  }
  echo "setup: using $py ($("$py" -V 2>&1))" >&2
  rm -rf .venv
  "$py" -m venv .venv
fi

stamp=.venv/.attnjax-installed
want=$(cat pyproject.toml constraints.txt | cksum)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  .venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip >&2
  .venv/bin/python -m pip install -q --disable-pip-version-check -c constraints.txt \
    -e ".[test,bench,experiments]" >&2
  echo "$want" > "$stamp"
fi
