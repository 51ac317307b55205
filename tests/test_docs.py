"""The code the documentation shows runs: every ```python block of README.md and docs/**/*.md.

Convention: a block fenced as ```python is run; one that cannot run on its own (it needs a trained
trainer, the Hub, a GPU) is fenced as ``` { .python .no-run } and only shown. A page's blocks run in
order in one namespace (a later block may use what an earlier one made), in a fresh working directory,
offline (tests/conftest.py). Other fences (bash, text, yaml) are not run; any other info string is an
error here, since the site would render it as a plain paragraph or untested code.
"""

import pathlib
import re

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
RUN = "python"
SHOWN = {"", "bash", "text", "yaml", "json", "{ .python .no-run }"}
FENCE = re.compile(r"^```(.*)$")


def code_blocks(path: pathlib.Path) -> list[tuple[int, str, str]]:
    """(line number of the opening fence, info string, code) of every top-level fenced block of `path`."""
    blocks, lines, opened = [], path.read_text().splitlines(), None
    for number, line in enumerate(lines, 1):
        match = FENCE.match(line)
        if not match:
            continue
        if opened is None:
            opened, info, body_start = number, match.group(1).strip(), number
        else:
            blocks.append((opened, info, "\n".join(lines[body_start:number - 1])))
            opened = None
    assert opened is None, f"{path}: the code block opened at line {opened} is never closed"
    return blocks


def runnable(path: pathlib.Path) -> list[tuple[int, str]]:
    return [(number, code) for number, info, code in code_blocks(path) if info == RUN]


def test_fences_are_known():
    """Every fence is run (```python) or one of the shown kinds: a typo such as ```python skip must not
    silently drop a block from these tests (nor render it as a paragraph)."""
    for path in PAGES:
        for number, info, _ in code_blocks(path):
            assert info == RUN or info in SHOWN, (
                f"{path.relative_to(ROOT)}:{number}: code fence info {info!r}; use ```python (run by "
                f"tests/test_docs.py) or one of {sorted(SHOWN)}")


def test_pages_have_examples():
    """The pages that teach the API carry runnable examples (a refactor of the docs must not drop them all)."""
    with_code = {str(path.relative_to(ROOT)) for path in PAGES if runnable(path)}
    for page in ("README.md", "docs/quickstart.md", "docs/how-to/trl.md", "docs/how-to/language-models.md",
                 "docs/concepts/audit-and-guards.md"):
        assert page in with_code, f"{page} has no ```python block run by this test"


@pytest.mark.parametrize("path", [p for p in PAGES if runnable(p)], ids=lambda p: str(p.relative_to(ROOT)))
def test_page_examples_run(path, tmp_path, monkeypatch):
    blocks = runnable(path)
    if any("grape_hf.sft" in code or "from trl" in code for _, code in blocks):
        pytest.importorskip("trl")
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    namespace = {"__name__": "__docs__"}
    for number, code in blocks:
        where = f"{path.relative_to(ROOT)}:{number}"
        try:
            exec(compile(code, where, "exec"), namespace)
        except Exception as error:
            raise AssertionError(f"the example at {where} fails: {type(error).__name__}: {error}") from error
