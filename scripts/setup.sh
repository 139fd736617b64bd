#!/usr/bin/env bash
# Set-up for sslbench on a fresh machine (README's two commands start with it):
#   - a virtual environment in .venv with sslbench and its dependencies (editable, with
#     the dev extra for pytest); re-running only checks what is installed;
#   - Fashion-MNIST: Debian's dataset-fashion-mnist package when run as root with apt;
#     otherwise the harness falls back to torchvision's download into data/ on first use.
# Usage: bash scripts/setup.sh        (PYTHON=python3.11 to choose the interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
echo "setup: installing sslbench and its dependencies into .venv (the first time takes a few minutes)"
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'

FMNIST=/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
if [ ! -f "$FMNIST" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing Debian's dataset-fashion-mnist"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 ||
      { apt-get update -q >/dev/null && apt-get install -y -q dataset-fashion-mnist >/dev/null; } ||
      echo "setup: warning: could not install dataset-fashion-mnist; torchvision's download will be tried on first use"
  else
    echo "setup: Fashion-MNIST not in /usr/share/datasets; torchvision will download it into data/ on first use" \
         "(or: sudo apt-get install dataset-fashion-mnist)"
  fi
fi
echo "setup: done"
