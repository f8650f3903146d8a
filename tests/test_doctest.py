"""Docstring examples (torch's template: math, Args, Shape, Examples) and README snippets run as written."""
from __future__ import annotations

import doctest
import re
import warnings
from pathlib import Path

import pytest

MODULES = [
    "crossent",
    "crossent.functional",
    "crossent.modules",
    "crossent.linear",
    "crossent.distributed",
    "crossent.hf",
    "crossent.stats",
    "crossent.cli",
    "crossent._core.diagnostics",
    "crossent.cli.demo",
]
README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = pytest.importorskip(name)
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS)
    for test in finder.find(module, name, globs={}):
        runner.run(test)
    results = runner.summarize(verbose=False)
    assert results.failed == 0, f"{results.failed} of {results.attempted} examples failed in {name}"


def _python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


@pytest.mark.parametrize("index", range(len(_python_blocks(README.read_text()))))
def test_readme_python_blocks_run(index):
    block = _python_blocks(README.read_text())[index]
    if "# not run in tests" in block:
        pytest.skip("needs a GPU, a process group or a download")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # README examples must not trigger crossent's warnings
        exec(compile(block, f"README.md block {index}", "exec"), {"__name__": "readme"})
