"""dsdm's Python dependencies for a bare GPU machine (torch preinstalled, nothing fetchable, <= 64 MiB carried in).

  prepare PYVER OUT.tar.xz   (here, with a package index) pip-download the manylinux x86_64 wheels of every package
                             gpu_check needs besides torch for Python PYVER, unpack them and pack the tree as
                             tar.xz with a DSDM_DEPS_TAG file (cp311 x86_64): ~44 MiB for cp311, where the wheels
                             themselves are 65 MiB (pyarrow alone is 40).
  install SRC TARGET         (on the device) for every module that does not import, unpack it into TARGET (put on
                             PYTHONPATH by gpu_check.sh), from SRC = such a tar.xz or a directory of .whl files.
                             Prints the Python version; a tag mismatch is a one-line error saying how to prepare
                             the right file. Exit 3 when numpy or tqdm (needed by every section) stay missing.

Uses only the standard library (no pip on the device).
"""

from __future__ import annotations

import importlib.util
import platform
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

# importable module -> distribution. numpy + tqdm: every section; the rest: the end-to-end run and the gpu tests.
NEED = {
    "numpy": "numpy",
    "tqdm": "tqdm",
    "pyarrow": "pyarrow==17.0.0",  # the smallest pyarrow that supports numpy 2 (40 MB wheel)
    "zstandard": "zstandard",
    "tokenizers": "tokenizers",
    "safetensors": "safetensors",
    "yaml": "pyyaml",
    "pytest": "pytest",
    "pluggy": "pluggy",
    "iniconfig": "iniconfig",
    "packaging": "packaging",
}
CORE = ("numpy", "tqdm")
TAG_FILE = "DSDM_DEPS_TAG"


def here_tag() -> str:
    return f"cp{sys.version_info[0]}{sys.version_info[1]} {platform.machine()}"


def prepare(pyver: str, out: Path) -> None:
    major, minor = pyver.split(".")[:2]
    with tempfile.TemporaryDirectory() as tmp:
        wheels, tree = Path(tmp) / "wheels", Path(tmp) / "tree"
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", pyver]
        for plat in ("manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux_2_28_x86_64"):
            cmd += ["--platform", plat]
        subprocess.run(cmd + ["-d", str(wheels), *NEED.values()], check=True)
        for whl in sorted(wheels.glob("*.whl")):
            with zipfile.ZipFile(whl) as z:
                z.extractall(tree)
        (tree / TAG_FILE).write_text(f"cp{major}{minor} x86_64\n")
        out.parent.mkdir(parents=True, exist_ok=True)
        with tarfile.open(out, "w:xz", preset=6) as t:
            t.add(tree, arcname=".")
    print(f"{out}: {out.stat().st_size / 2**20:.1f} MiB for cp{major}{minor} x86_64")


def wheel_fits(name: str) -> bool:
    """name-version[-build]-python-abi-platform.whl usable by this interpreter on this machine."""
    py, abi, plat = name[:-4].split("-")[-3:]
    if plat != "any" and not (plat.endswith(platform.machine()) and "linux" in plat):
        return False
    tags = py.split(".")
    if any(t.startswith("py3") for t in tags):
        return True
    if abi == "abi3":
        return any(t.startswith("cp3") and int(t[3:]) <= sys.version_info[1] for t in tags)
    return f"cp{sys.version_info[0]}{sys.version_info[1]}" in tags


def missing() -> list[str]:
    return [m for m in NEED if importlib.util.find_spec(m) is None]


def install(src: str, target: Path) -> int:
    print(f"gpu_deps: Python {platform.python_version()} ({here_tag()})")
    todo = missing()
    print(f"gpu_deps: already importable: {', '.join(m for m in NEED if m not in todo) or '-'}")
    if todo and src:
        path = Path(src)
        if path.is_file():
            with tarfile.open(path) as t:
                tag = t.extractfile(f"./{TAG_FILE}").read().decode().strip()
                if tag != here_tag():
                    print(
                        f"gpu_deps: {path} holds packages for {tag}, this machine runs {here_tag()}: prepare "
                        f"`python benchmarks/gpu_deps.py prepare {sys.version_info[0]}.{sys.version_info[1]} "
                        "runs/gpu-deps.tar.xz` (docs/benchmarks.md 'GPU') and carry that instead"
                    )
                else:
                    t.extractall(target, filter="data") if sys.version_info >= (3, 12) else t.extractall(target)
                    print(f"gpu_deps: unpacked {path} into {target}")
        else:
            for mod in todo:
                key = NEED[mod].split("=")[0].replace("-", "_").lower()
                found = sorted(
                    w for w in path.glob("*.whl") if w.name.split("-")[0].lower() == key and wheel_fits(w.name)
                )
                if found:
                    with zipfile.ZipFile(found[-1]) as z:
                        z.extractall(target)
                    print(f"gpu_deps: unpacked {found[-1].name}")
        importlib.invalidate_caches()
        sys.path.insert(0, str(target))
        todo = missing()
    if todo:
        print(
            f"gpu_deps: STILL MISSING for Python {platform.python_version()}: {', '.join(todo)} "
            f"(source: {src or 'none, pass --wheels'}); the sections needing them will report the import error"
        )
    return 3 if set(CORE) & set(todo) else 0


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "prepare":
        prepare(sys.argv[2], Path(sys.argv[3]))
    elif len(sys.argv) == 4 and sys.argv[1] == "install":
        sys.exit(install(sys.argv[2], Path(sys.argv[3])))
    else:
        sys.exit(__doc__)
