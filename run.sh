#!/usr/bin/env bash
# Set-up and run in one step, on a fresh machine or an existing checkout.
#   ./run.sh train [engram train flags]   the main job (local Ray, 2 shards on 127.0.0.1, built-in corpus)
#   ./run.sh test  [pytest args]          generated-stub check, lint, the test suite
#   ./run.sh engram ARGS...               any engram command inside the project's venv
# The venv lives in .venv; it is (re)built when pyproject.toml changes.
set -euo pipefail
cd "$(dirname "$0")"

# torch is pinned and installed first: this machine's 2.13.0 wheel is the CPU build; an unpinned
# torch may pull a multi-GB CUDA build. On a GPU machine PyPI's torch==2.13.0 wheel is the CUDA
# build; set ENGRAM_TORCH to another spec if you need a different CUDA variant.
TORCH_SPEC="${ENGRAM_TORCH:-torch==2.13.0}"

setup() {
  local stamp=.venv/.engram-installed
  local want
  want="$(sha256sum pyproject.toml | cut -c1-16) $TORCH_SPEC"
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then return; fi
  echo "[run.sh] setting up .venv ($TORCH_SPEC, engram[dev])" >&2
  python3 -m venv .venv
  .venv/bin/pip install -q --disable-pip-version-check "$TORCH_SPEC"
  .venv/bin/pip install -q --disable-pip-version-check -e '.[dev]'
  echo "$want" > "$stamp"
}

cmd="${1:-}"
[ $# -gt 0 ] && shift
case "$cmd" in
  train)
    setup
    exec .venv/bin/engram train "$@" ;;
  test)
    setup
    .venv/bin/python proto/generate.py --check
    .venv/bin/ruff check .
    # pytest exits 5 when it collected no test, which fails this script (set -e) like a failure.
    exec .venv/bin/python -m pytest -q "$@" ;;
  engram)
    setup
    exec .venv/bin/engram "$@" ;;
  *)
    echo "usage: ./run.sh train [flags] | ./run.sh test [pytest args] | ./run.sh engram ARGS" >&2
    exit 2 ;;
esac
