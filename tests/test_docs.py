"""Every ```python block of README.md and docs/*.md runs (blocks marked `# doc-test: skip` need the Hub)."""

import re
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"```python\n(.*?)```", re.DOTALL)


def blocks():
    for page in PAGES:
        for index, code in enumerate(BLOCK.findall(page.read_text())):
            yield pytest.param(code, id=f"{page.relative_to(ROOT)}[{index}]")


@pytest.mark.parametrize("code", list(blocks()))
def test_docs_code_block_runs(code, tmp_path, monkeypatch):
    if "# doc-test: skip" in code:
        compile(code, "<docs>", "exec")  # still valid Python
        return
    monkeypatch.chdir(tmp_path)  # outputs/ land in a temporary folder
    exec(compile(code, "<docs>", "exec"), {"__name__": "__docs__"})


def test_docs_have_runnable_blocks():
    runnable = [c for c in BLOCK.findall("".join(p.read_text() for p in PAGES)) if "# doc-test: skip" not in c]
    assert len(runnable) >= 2
