#!/usr/bin/env bash
# Installs debiformer and everything it needs into ./.venv (or $DEBIFORMER_VENV).
#
# - System packages (Debian/Ubuntu, when run as root or with sudo): the OpenCV and
#   libjpeg-turbo headers FFCV builds against, and the Fashion-MNIST data set used
#   by the quick start. Without apt-get, FFCV is skipped and the torchvision loader is used.
# - Python packages come from the package index. pip configuration that points at a
#   local CPU-only torch wheel is bypassed, because that wheel does not match the
#   index's torchvision builds.
set -euo pipefail
cd "$(dirname "$0")"
venv="${DEBIFORMER_VENV:-.venv}"
python="${PYTHON:-python3}"

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else return 1; fi; }

extras="test,detection,viz,tensorboard,export,wandb,mlflow"
if command -v apt-get >/dev/null && as_root true 2>/dev/null; then
    echo "[install] system packages: FFCV build headers and Fashion-MNIST"
    as_root apt-get update -qq
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends \
        libopencv-dev libturbojpeg0-dev pkg-config dataset-fashion-mnist >/dev/null
    extras="test,detection,viz,tensorboard,export,wandb,mlflow,ffcv"
else
    echo "[install] no apt-get with root rights: skipping FFCV (the torchvision loader will be used)"
fi

export PIP_CONFIG_FILE=/dev/null PIP_FIND_LINKS= PIP_DISABLE_PIP_VERSION_CHECK=1
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
echo "[install] python packages into $venv (extras: $extras)"
"$venv/bin/python" -m pip install -q --upgrade pip
"$venv/bin/python" -m pip install -q -e ".[$extras]" tox ruff
"$venv/bin/debiformer" --version
