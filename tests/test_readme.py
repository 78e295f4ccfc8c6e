"""The README's Python snippets run as written (each in a fresh namespace, from an empty working folder)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
SNIPPETS = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.DOTALL)


def test_the_readme_has_its_snippets():
    assert len(SNIPPETS) == 2


@pytest.mark.slow  # each compiles a tiny model: ~15 s quiet, minutes on a loaded 2-core host
@pytest.mark.parametrize("index", range(len(SNIPPETS)))
def test_readme_snippet_runs(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(SNIPPETS[index], f"README.md snippet {index}", "exec"), namespace)
    assert ("velocity" in namespace) if index == 0 else ("result" in namespace)
