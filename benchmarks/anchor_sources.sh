#!/usr/bin/env bash
# Lays out the anchors' sources in .anchor/ (git-ignored) for benchmarks/anchors.py: mamba_ssm
# 2.3.2.post1's csrc/selective_scan and Python package, causal-conv1d 1.7.0's csrc and package,
# from their PyPI sdists. Downloads the sdists unless their paths are given (machines without a
# network: download them elsewhere and pass the files).
#   bash benchmarks/anchor_sources.sh [mamba_ssm-2.3.2.post1.tar.gz causal_conv1d-1.7.0.tar.gz]
set -euo pipefail
cd "$(dirname "$0")/.."
MS=${1:-}
CC=${2:-}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
if [ -z "$MS" ] || [ -z "$CC" ]; then
  python -m pip download -q --no-deps --no-binary :all: --no-build-isolation -d "$tmp" \
    mamba-ssm==2.3.2.post1 causal-conv1d==1.7.0 || true
  MS=$(ls "$tmp"/mamba_ssm-*.tar.gz) CC=$(ls "$tmp"/causal_conv1d-*.tar.gz)
fi
tar xzf "$MS" -C "$tmp"
tar xzf "$CC" -C "$tmp"
rm -rf .anchor/src .anchor/causal_conv1d_src .anchor/pkgs
mkdir -p .anchor/src .anchor/pkgs
cp -r "$tmp"/mamba_ssm-*/csrc/selective_scan .anchor/src/
cp -r "$tmp"/mamba_ssm-*/mamba_ssm .anchor/pkgs/
cp -r "$tmp"/causal_conv1d-*/csrc .anchor/causal_conv1d_src
cp -r "$tmp"/causal_conv1d-*/causal_conv1d .anchor/pkgs/
echo "anchor sources in .anchor/: $(basename "$MS"), $(basename "$CC")"
