#!/usr/bin/env bash
# Set-up and run in one step, on a fresh machine or an existing checkout.
#   ./run.sh train [engram train flags]   the main job (local Ray, 2 shards on 127.0.0.1, built-in corpus)
#   ./run.sh test  [pytest args]          stub check, lint, format check, mypy, the tests
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

# tests/benchmarks compares against a real Redis and skips that part without redis-server: CI
# (root, Debian) installs it here. Offline or unprivileged this only warns; the run goes on.
ensure_redis() {
  command -v redis-server >/dev/null 2>&1 && return 0
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "[run.sh] warning: no redis-server (not root with apt-get); its tests will skip" >&2
    return 0
  fi
  echo "[run.sh] installing redis-server (apt-get) for the Redis baseline tests" >&2
  local apt=(env DEBIAN_FRONTEND=noninteractive apt-get -y -q)
  if ! "${apt[@]}" install redis-server >/dev/null 2>&1; then
    # the package lists may be stale or missing: refresh once, then try again
    "${apt[@]}" update >/dev/null 2>&1 || true
    "${apt[@]}" install redis-server >/dev/null 2>&1 || true
  fi
  command -v redis-server >/dev/null 2>&1 \
    || echo "[run.sh] warning: could not install redis-server; its tests will skip" >&2
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
    .venv/bin/ruff format --check .
    .venv/bin/mypy  # the files [tool.mypy] names: engine, gRPC layer, ops
    ensure_redis
    # The layering (tests/test_layers.py) and the base install (tests/test_packaging.py) are
    # tests like the rest. pytest exits 5 when it collected no test: that fails this run too.
    exec .venv/bin/python -m pytest -q "$@" ;;
  engram)
    setup
    exec .venv/bin/engram "$@" ;;
  *)
    echo "usage: ./run.sh train [flags] | ./run.sh test [pytest args] | ./run.sh engram ARGS" >&2
    exit 2 ;;
esac
