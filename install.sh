#!/usr/bin/env bash
# Set up a working environment from nothing: Debian's Fashion-MNIST package (the demo's
# data), a virtualenv in .venv, and this project with its test extras. Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")"
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq dataset-fashion-mnist \
        || echo "warning: could not install dataset-fashion-mnist; Fashion-MNIST will be downloaded by torchvision" >&2
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[test]"
