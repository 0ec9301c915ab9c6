#!/usr/bin/env bash
# Idempotent set-up of a machine for dalle-repro: Debian's emoji font and Unicode data (the demo data),
# g++ when there is no C++ compiler,
# a venv in .venv, torch (the CPU wheel torch==2.13.0 when there is no GPU), and this package.
# Usage: bash tools/setup.sh [--dev]     (--dev adds the test tools, headless Chromium and OpenAI's DALL-E package)
set -euo pipefail
cd "$(dirname "$0")/.."
dev=0
[ "${1:-}" = "--dev" ] && dev=1

need=()
[ -f /usr/share/fonts/truetype/noto/NotoColorEmoji.ttf ] || need+=(fonts-noto-color-emoji)
[ -f /usr/share/unicode/emoji/emoji-test.txt ] || need+=(unicode-data)
# a C++ compiler: the CPU attention kernel (dalle_repro/kernels/cpu.py) and DeepSpeed's CPU ops build with it
command -v "${CXX:-g++}" >/dev/null 2>&1 || need+=(g++)
# --dev: headless Chromium and its driver, for the playground's browser test (tests/test_serve.py)
if [ $dev = 1 ]; then
  command -v chromium >/dev/null 2>&1 || need+=(chromium)
  command -v chromedriver >/dev/null 2>&1 || need+=(chromium-driver)
fi
if [ ${#need[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" = 0 ] || sudo=sudo
  echo "setup: installing Debian packages: ${need[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >/dev/null
fi

[ -x .venv/bin/python ] || { echo "setup: creating .venv"; "${PYTHON:-python3}" -m venv .venv; }
pip() { .venv/bin/python -m pip -q --disable-pip-version-check "$@" 2>&1 | grep -v "is ignored" || true; }

if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "setup: GPU found, installing torch (CUDA build)"
    pip install torch
  else
    echo "setup: no GPU, installing the CPU build torch==2.13.0"
    pip install torch==2.13.0
  fi
fi

# Reinstall the package only when its metadata or this script changed.
want="$(cat pyproject.toml tools/setup.sh | sha256sum | cut -c1-16)"
stamp=.venv/.dalle-repro-setup
have() { [ -f "$stamp" ] && grep -qx "$1 $want" "$stamp"; }
if ! have base && ! have dev; then
  echo "setup: installing dalle_repro (editable)"
  pip install --no-build-isolation -e .
  .venv/bin/python -c "import dalle_repro, tokenizers, webdataset, omegaconf, deepspeed, transformers, torchmetrics, matplotlib, fastapi, uvicorn" || { echo "setup: install failed" >&2; exit 1; }
  echo "base $want" >>"$stamp"
fi
if [ $dev = 1 ] && ! have dev; then
  echo "setup: installing the test tools and OpenAI's DALL-E package (parity tests)"
  pip install --no-build-isolation -e ".[dev]"
  pip install --no-deps "DALL-E==0.1"
  .venv/bin/python -c "import pytest, hypothesis, dall_e, selenium" || { echo "setup: dev install failed" >&2; exit 1; }
  echo "dev $want" >>"$stamp"
fi
echo "setup: ready (.venv)"
