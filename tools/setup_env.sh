#!/usr/bin/env bash
# Create or reuse .venv and install the engine into it, on a fresh machine.
# - Debian packages: Fashion-MNIST (the demo's data) and the libraries ffcv
#   builds against; installed when missing and we are root.
# - torch/torchvision: the registry's matched pair. The machine's pip config
#   and PIP_FIND_LINKS point at a local CPU-only torch wheel that the
#   registry's torchvision cannot load against, so both are bypassed here.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
DEB_PKGS="dataset-fashion-mnist libturbojpeg0-dev libopencv-dev pkg-config"

missing=""
for p in $DEB_PKGS; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "setup: installing Debian packages:$missing"
    apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q $missing >/dev/null
  else
    echo "setup: missing Debian packages:$missing (run as root, or: sudo apt-get install$missing)" >&2
    exit 1
  fi
fi

[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
stamp="$VENV/.engine-installed"
want=$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
echo "setup: installing the engine into $VENV (first time: a few minutes)"
PIP_CONFIG_FILE=/dev/null PIP_FIND_LINKS= "$VENV/bin/pip" install -q -c constraints.txt -e '.[ffcv,dev]'
"$VENV/bin/python" -c "import torch, torchvision, timm, ray, webdataset, ffcv, engine" \
  || { echo "setup: installed packages do not import" >&2; exit 1; }
echo "$want" > "$stamp"
