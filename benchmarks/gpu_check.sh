#!/usr/bin/env bash
# The prepared GPU check of issue 15 (benchmarks/gpu_check.py; docs/benchmarks.md "GPU"). On a bare machine with
# torch preinstalled and nothing fetchable: missing Python packages come from local wheels (--wheels DIR), unpacked
# into a private directory on PYTHONPATH (no pip needed, the torch environment is not touched).
#
#   benchmarks/gpu_check.sh [--wheels DIR] [--out DIR] [--smoke] [other gpu_check.py flags]
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
# module:distribution. numpy + tqdm are needed by everything; the rest by the end-to-end run (pool, tokenizer, models)
# and by the gpu tests (pytest).
$PY - "$WHEELS" "$DEPS" <<'PYEOF'
import importlib.util, re, sys, zipfile, platform
from pathlib import Path

wheels, target = sys.argv[1], Path(sys.argv[2])
need = {"numpy": "numpy", "tqdm": "tqdm", "pyarrow": "pyarrow", "tokenizers": "tokenizers",
        "safetensors": "safetensors", "yaml": "pyyaml", "pytest": "pytest", "pluggy": "pluggy",
        "iniconfig": "iniconfig", "packaging": "packaging"}
core = {"numpy", "tqdm"}
missing = {m: d for m, d in need.items() if importlib.util.find_spec(m) is None}
cp = "cp%d%d" % sys.version_info[:2]
minor = sys.version_info[1]

def fits(name):
    # name-version-[build-]python-abi-platform.whl
    py, abi, plat = name[:-4].split("-")[-3:]
    if plat != "any" and not (plat.endswith("x86_64") and platform.machine() == "x86_64" and "linux" in plat):
        return False
    if py.startswith("py3") or py == "py2.py3":
        return True
    if abi == "abi3":
        return any(p.startswith("cp3") and int(p[3:]) <= minor for p in py.split("."))
    return cp in py.split(".")

installed, failed = [], []
for mod, dist in missing.items():
    cands = []
    if wheels:
        key = dist.replace("-", "_").lower()
        cands = [w for w in Path(wheels).glob("*.whl") if w.name.split("-")[0].lower() == key and fits(w.name)]
    if not cands:
        failed.append(dist)
        continue
    with zipfile.ZipFile(sorted(cands)[-1]) as z:
        z.extractall(target)
    installed.append(sorted(cands)[-1].name)
print("gpu_check: already importable:", ", ".join(sorted(set(need) - set(missing))) or "-")
print("gpu_check: unpacked from wheels:", ", ".join(installed) or "-")
if failed:
    have = sorted(p.name for p in Path(wheels).glob("*.whl")) if wheels else []
    print(f"gpu_check: NO MATCHING WHEEL for Python {platform.python_version()} ({cp}, {platform.machine()}): "
          f"{', '.join(failed)}. Wheels given: {have or 'none (--wheels DIR)'}. Prepare them as in "
          "docs/benchmarks.md 'GPU' with --python-version " + f"{sys.version_info[0]}.{minor}.")
    if core & {m for m, d in missing.items() if d in failed}:
        print("gpu_check: numpy and tqdm are needed by every section: stopping.")
        sys.exit(3)
    print("gpu_check: continuing; the sections that need them (e2e, tests) will report the import error.")
PYEOF
exec $PY benchmarks/gpu_check.py "${ARGS[@]+"${ARGS[@]}"}"
