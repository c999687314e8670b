#!/usr/bin/env bash
# Set up nas-headprune on a fresh machine and run the main job on the embedded default.
#   ./setup.sh                 install, then run the main job
#   ./setup.sh --install-only  install only (what CI uses)
set -euo pipefail
cd "$(dirname "$0")"

if [ ! -d /usr/share/datasets/fashion-mnist ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist
    else
        echo "note: Fashion-MNIST not found in /usr/share/datasets/fashion-mnist;" \
             "install the Debian package dataset-fashion-mnist or set NAS_HEADPRUNE_DATA" >&2
    fi
fi

python3 -m pip install -q -c constraints.txt -e ".[dev,nni,submitit,hf]"

if [ "${1:-}" = "--install-only" ]; then
    exit 0
fi
export HF_HUB_OFFLINE=1
exec nas-headprune search --strategy magnitude
