"""The docs name things that exist: every test function, repository path and Python module that a Markdown file
of the repository cites is checked against the tree.

What counts as a citation (chosen so that nothing else is caught):
- a test: `test_\\w+` anywhere in the text, not followed by `.py`; it must be a function in some tests/*.py, and in
  that very file when written `test_x.py::test_name`;
- a path: in inline code, a fenced code block or a link, a string that starts with one of the repository's
  top-level folders (`gl_ray/`, `tests/`, `docs/`, ...) or is a root file (`Makefile`, `pyproject.toml`); a link
  target resolves from the Markdown file's own folder. Paths with wildcards or placeholders (`*`, `<x>`, `{x}`,
  `...`) and anything else (`runs/...`, `data/...`, `s3://...`: outputs of a run) are not checked; and the module
  names in the first column of README.md's Layout table, which are relative to `gl_ray/`;
- a module: `python -m NAME`, or a dotted name in code (`gl_ray.ray_utils.ensure_ray`), whose first part is one
  of the repository's packages; the longest dotted prefix must be a module file and the next part, if any, a
  name defined at its top level.

Run alone: `.venv/bin/python -m pytest -q tests/test_docs.py`.
"""

from __future__ import annotations

import ast
import os
import re
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TOP_FOLDERS = ("gl_ray", "tests", "docs", "benchmarks", "pipelines", "cluster", "tune_spaces", ".ci")
ROOT_FILES = ("Makefile", "pyproject.toml", "README.md", "setup.py", "setup.cfg", "requirements.txt", ".gitignore")
PACKAGES = ("gl_ray", "pipelines", "benchmarks", "tests")
# Folders that hold no docs of the repository: what runs and builds write at the top (.gitignore), and anywhere the
# virtualenv, git, caches and packaging metadata.
SKIP_TOP = {"runs", "data", "build", "tmp", "results"}
SKIP_ANYWHERE = {".git", ".venv", ".pytest_cache", ".ruff_cache", "__pycache__", "node_modules"}

TEST_NAME = re.compile(r"\b(test_\w+)(\.py\b)?")
TEST_IN_FILE = re.compile(r"\b(test_\w+\.py)::(test_\w+)")
INLINE_CODE = re.compile(r"(`+)(.+?)\1")
LINK = re.compile(r"\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REF_LINK = re.compile(r"^\s*\[[^\]]+\]:\s*(\S+)")
# A path starts after a space, quote, '(' or '=' (not after '/', '.', a word character, '$' or '~': so
# `/mnt/shared/tests/x`, `s3://b/docs/x`, `$RUN/tests` and `runs/x/docs` are not taken for repository paths).
PATH = re.compile(r"(?<![\w/.\-~$])(?:\./)?(?:(?:" + "|".join(re.escape(d) for d in TOP_FOLDERS)
                  + r")/[^\s`'\"),;:|\[\]]*|(?:" + "|".join(re.escape(f) for f in ROOT_FILES) + r")(?![\w.\-/]))")
PLACEHOLDER = re.compile(r"[*?<>{}$]|\.\.\.|…")
MODULE_FLAG = re.compile(r"\bpython3?\s+-m\s+([A-Za-z_][\w.]*)")
DOTTED = re.compile(r"(?<![\w./\-])((?:" + "|".join(PACKAGES) + r")(?:\.[A-Za-z_]\w*)+)")


def markdown_files() -> list[Path]:
    """Every Markdown file of the repository (README.md, docs/, cluster/, tests/fixtures/, ...)."""
    found = []
    for folder, dirs, files in os.walk(REPO):
        top = Path(folder) == REPO
        dirs[:] = [d for d in dirs if d not in SKIP_ANYWHERE and not d.endswith(".egg-info")
                   and not (top and d in SKIP_TOP)]
        found += [Path(folder) / f for f in files if f.endswith(".md")]
    return sorted(found)


def lines(doc: Path) -> Iterator[tuple[int, str, list[str]]]:
    """(line number, the line, its code parts: the whole line inside a fenced block, else its inline code spans)."""
    fence = None
    for n, line in enumerate(doc.read_text(encoding="utf-8").splitlines(), 1):
        m = re.match(r"\s*(```+|~~~+)", line)
        if m and (fence is None or m.group(1).startswith(fence)):
            fence = m.group(1)[:3] if fence is None else None
            continue
        yield n, line, [line] if fence else [m.group(2) for m in INLINE_CODE.finditer(line)]


def layout_modules() -> Iterator[tuple[int, str]]:
    """(line number, path under gl_ray/) of each `.py` name in the first column of README.md's Layout table."""
    section = None
    for n, line in enumerate((REPO / "README.md").read_text(encoding="utf-8").splitlines(), 1):
        if line.startswith("## "):
            section = line[3:].strip()
        elif section == "Layout" and line.startswith("|"):
            first_cell = line.split("|")[1]
            for m in INLINE_CODE.finditer(first_cell):
                if m.group(2).endswith(".py"):
                    yield n, m.group(2)


def where(doc: Path, n: int) -> str:
    return f"{doc.relative_to(REPO)}:{n}"


def defined_tests() -> dict[str, set[str]]:
    """{tests file name: the test functions (and methods) it defines}."""
    found = {}
    for path in sorted((REPO / "tests").glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        found[path.name] = {node.name for node in ast.walk(tree)
                            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
                            and node.name.startswith("test_")}
    return found


def top_level_names(module: Path) -> set[str]:
    names = set()
    for node in ast.parse(module.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                names.update(n.id for n in ast.walk(target) if isinstance(n, ast.Name))
        elif isinstance(node, ast.Import | ast.ImportFrom):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
    return names


def module_file(dotted: str) -> Path | None:
    """The file behind a module name: pkg/mod.py, or pkg/mod/__init__.py for a package."""
    base = REPO.joinpath(*dotted.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def module_problem(dotted: str, *, run_as_main: bool) -> str | None:
    """Why `dotted` names no module (or module attribute) of the repository; None when it does."""
    parts = dotted.split(".")
    for k in range(len(parts), 0, -1):
        module = module_file(".".join(parts[:k]))
        if module is None:
            continue
        rest = parts[k:]
        if run_as_main and rest:
            return f"`python -m {dotted}`: no module {dotted} (found {'.'.join(parts[:k])})"
        if run_as_main and module.name == "__init__.py" and not (module.parent / "__main__.py").is_file():
            return f"`python -m {dotted}`: package without __main__.py"
        if rest and rest[0] not in top_level_names(module):
            return f"`{dotted}`: {module.relative_to(REPO)} defines no {rest[0]}"
        return None
    return f"`{dotted}`: no such module in the repository"


def test_docs_name_only_tests_that_exist():
    defined = defined_tests()
    everywhere = set().union(*defined.values())
    problems = []
    for doc in markdown_files():
        for n, line, _ in lines(doc):
            for m in TEST_NAME.finditer(line):
                if not m.group(2) and m.group(1) not in everywhere:
                    problems.append(f"{where(doc, n)}: no test function {m.group(1)} in tests/*.py")
            for m in TEST_IN_FILE.finditer(line):
                file, name = m.groups()
                if file not in defined:
                    problems.append(f"{where(doc, n)}: no tests/{file}")
                elif name in everywhere and name not in defined[file]:
                    problems.append(f"{where(doc, n)}: {name} is not in tests/{file}")
    assert not problems, "docs cite tests that do not exist:\n" + "\n".join(problems)


def test_docs_name_only_paths_that_exist():
    problems = []
    for doc in markdown_files():
        for n, line, code in lines(doc):
            for target in LINK.findall(line) + REF_LINK.findall(line):
                target = target.split("#")[0]
                if target and not re.match(r"[a-z][a-z0-9+.-]*:", target) and not PLACEHOLDER.search(target):
                    if not (doc.parent / target).exists():
                        problems.append(f"{where(doc, n)}: link to {target}, which does not exist")
            for text in code:
                for path in PATH.findall(text):
                    path = path.removeprefix("./").rstrip(".:")
                    if not PLACEHOLDER.search(path) and not (REPO / path).exists():
                        problems.append(f"{where(doc, n)}: {path} does not exist")
    for n, name in layout_modules():
        if not (REPO / "gl_ray" / name).is_file():
            problems.append(f"README.md:{n}: the Layout table lists gl_ray/{name}, which does not exist")
    assert not problems, "docs cite paths that do not exist:\n" + "\n".join(problems)


def test_docs_name_only_modules_that_exist():
    problems = []
    for doc in markdown_files():
        for n, line, code in lines(doc):
            for name in MODULE_FLAG.findall(line):
                name = name.rstrip(".")
                if name.split(".")[0] in PACKAGES:
                    if problem := module_problem(name, run_as_main=True):
                        problems.append(f"{where(doc, n)}: {problem}")
            for text in code:
                for name in DOTTED.findall(MODULE_FLAG.sub("", text)):
                    if name.endswith((".py", ".md", ".yaml", ".json")):
                        continue  # a file name, checked as a path
                    if problem := module_problem(name, run_as_main=False):
                        problems.append(f"{where(doc, n)}: {problem}")
    assert not problems, "docs cite modules that do not exist:\n" + "\n".join(problems)
