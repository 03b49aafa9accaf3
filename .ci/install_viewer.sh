#!/usr/bin/env bash
# CI: what the attention viewer and its browser test need on a fresh Debian machine:
# Debian's chromium and its chromedriver (tests/test_viewer_browser.py drives them through
# selenium; nothing is downloaded at test time) and the project's "viewer" extra (Gradio,
# scikit-image, selenium). Runs ./install.sh first when there is no .venv yet. Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium chromium-driver
fi
chromium --version 2>/dev/null  # (Debian's wrapper script may complain on stderr)
chromedriver --version
[ -x .venv/bin/python ] || ./install.sh
.venv/bin/python -m pip install -q -e ".[test,viewer]"
