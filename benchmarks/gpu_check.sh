#!/usr/bin/env bash
# The prepared GPU check of issue 15 (benchmarks/gpu_check.py; docs/benchmarks.md "GPU"). On a bare machine with
# torch preinstalled and nothing fetchable: missing Python packages come from --wheels (benchmarks/gpu_deps.py: a
# prepared tar.xz or a directory of wheels), unpacked into a private directory on PYTHONPATH (no pip needed, the
# torch environment is not touched).
#
#   benchmarks/gpu_check.sh [--wheels runs/gpu-deps.tar.xz] [--out DIR] [--smoke] [other gpu_check.py flags]
#
# Writes DIR/gpu_check.json and DIR/gpu_check.md (default: $OUT if set, else runs/gpu_check). Full run <= 8 minutes on
# one H200; --smoke runs tiny sizes on the CPU in < 2 minutes (CI).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEELS=""
ARGS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --wheels) WHEELS="$2"; shift 2 ;;
    *) ARGS+=("$1"); shift ;;
  esac
done

echo "gpu_check: $($PY -c 'import sys, platform; print("Python", platform.python_version(), "cp%d%d" % sys.version_info[:2], platform.machine())')"
$PY -c 'import torch; print("gpu_check: torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())'

DEPS="${TMPDIR:-/tmp}/dsdm-gpu-check-deps"
export PYTHONPATH="$PWD:$DEPS${PYTHONPATH:+:$PYTHONPATH}"
# Missing packages (numpy, tqdm, pyarrow, tokenizers, ...) from --wheels: a tar.xz made by
# `python benchmarks/gpu_deps.py prepare 3.11 runs/gpu-deps.tar.xz`, or a directory of .whl files.
$PY benchmarks/gpu_deps.py install "$WHEELS" "$DEPS" || { echo "gpu_check: numpy and tqdm are needed by every section: stopping"; exit 3; }
exec $PY benchmarks/gpu_check.py "${ARGS[@]+"${ARGS[@]}"}"
