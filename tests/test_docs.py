"""The documentation's Python examples run, and the documentation builds.

Every fenced ``python`` block of ``README.md`` and ``docs/**/*.md`` runs: each file's blocks in
order, in one namespace (a block may use the names of the blocks above it, as a reader
following the page would), in a fresh temporary working directory. A block whose first line
is ``# doc: skip`` is shown to readers but not run; the contributing guide
(``docs/contributing.md``) says when that is allowed.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
SKIP_MARK = "# doc: skip"
FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*(?P<info>[^\n`]*)$")


def markdown_files() -> list[Path]:
    """README.md and every Markdown page under docs/ (not the build output)."""
    pages = sorted(p for p in DOCS.rglob("*.md") if not {"_build", "auto_examples"} & set(p.relative_to(DOCS).parts))
    return [ROOT / "README.md", *pages]


def python_blocks(text: str) -> list[tuple[int, str]]:
    """``(line, code)`` of each fenced block whose info string is ``python`` (or ``py``)."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, info, indent = m["fence"], m["info"].strip(), len(m["indent"])
        body, j = [], i + 1
        while j < len(lines) and not (
            lines[j].strip().startswith(fence[0] * len(fence)) and lines[j].strip().strip(fence[0]) == ""
        ):
            body.append(lines[j][indent:] if lines[j][:indent].strip() == "" else lines[j])
            j += 1
        lang = info.split()[0].lower() if info else ""
        if lang in ("python", "py"):
            blocks.append((i + 1, "\n".join(body) + "\n"))
        i = j + 1
    return blocks


def test_block_extraction():
    """Fences of any length, ``py`` and indented blocks are found; other languages are not."""
    text = "\n".join(
        [
            "```python",
            "a = 1",
            "```",
            "```bash",
            "make docs",
            "```",
            "````py",
            "b = a + 1",
            "````",
            "- item",
            "  ```python",
            "  c = b * 2",
            "  ```",
        ]
    )
    blocks = python_blocks(text)
    assert [line for line, _ in blocks] == [1, 7, 11]
    ns: dict = {}
    for _, code in blocks:
        exec(code, ns)
    assert ns["c"] == 4


FILES = markdown_files()
#: pages whose blocks take more than ~10 s together (measured on 2 shared CPU cores: README
#: 50 s, the diffusion tutorial 25 s with its score-network training and replicated corrector
#: runs, the peptide tutorial 12 s with OpenMM and the shipped flow); `make test-all` runs them
SLOW = {"README.md", "docs/tutorials/diffusion.md", "docs/tutorials/peptides.md"}


def _page_params():
    params = []
    for path in FILES:
        if not python_blocks(path.read_text(encoding="utf-8")):
            continue
        name = path.relative_to(ROOT).as_posix()
        params.append(pytest.param(path, id=name, marks=[pytest.mark.slow] if name in SLOW else []))
    return params


@pytest.mark.parametrize("path", _page_params())
def test_python_blocks_run(path: Path, tmp_path, monkeypatch):
    """Every Python block of the page runs without error, in order, in one namespace."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    namespace: dict = {"__name__": "__docs__"}
    ran = 0
    for line, code in python_blocks(path.read_text(encoding="utf-8")):
        if code.lstrip().startswith(SKIP_MARK):
            continue
        exec(compile(code, f"{path.relative_to(ROOT)}:{line}", "exec"), namespace)
        ran += 1
    assert ran > 0, "every Python block of the page is skipped"


def test_skips_are_rare():
    """At most one block in ten is skipped, and every skip says why on its first line."""
    total, skipped = 0, []
    for path in FILES:
        for line, code in python_blocks(path.read_text(encoding="utf-8")):
            total += 1
            first = code.lstrip().splitlines()[0] if code.strip() else ""
            if first.startswith(SKIP_MARK):
                skipped.append((path.name, line, first))
    assert total > 0
    assert len(skipped) <= max(2, total // 10), skipped
    for name, line, first in skipped:
        reason = first[len(SKIP_MARK) :].strip(" :-—")
        assert reason, f"{name}:{line}: '{SKIP_MARK}' needs a reason on the same line"


def test_docs_build_without_warnings(tmp_path):
    """Sphinx builds the site (without running the gallery) with warnings as errors: every
    autodoc'd module imports, every docstring is valid reStructuredText, every cross-reference
    and toctree entry resolves."""
    for module in ("sphinx", "myst_parser", "sphinx_gallery"):
        pytest.importorskip(module, reason="the docs extra is not installed: pip install -e '.[docs]'")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    cmd = [
        sys.executable,
        "-m",
        "sphinx",
        "-W",
        "--keep-going",
        "-q",
        "-b",
        "dummy",
        "-D",
        "plot_gallery=0",
        "-d",
        str(tmp_path / "doctrees"),
        str(DOCS),
        str(tmp_path / "out"),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-5000:]
