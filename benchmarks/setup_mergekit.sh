#!/usr/bin/env bash
# The peer of benchmarks/extract_vs_mergekit.py in its own environment: benchmarks/.venv-mergekit.
# torch is pinned first (the CPU build on disk); mergekit then installs its own pins beside it.
set -euo pipefail
cd "$(dirname "$0")"
python3 -m venv .venv-mergekit
.venv-mergekit/bin/pip install -q --upgrade pip
.venv-mergekit/bin/pip install -q torch==2.13.0
.venv-mergekit/bin/pip install -q mergekit
.venv-mergekit/bin/mergekit-extract-lora --help > /dev/null && echo "mergekit ready: benchmarks/.venv-mergekit"
