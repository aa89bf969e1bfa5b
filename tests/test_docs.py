"""Every ```python block of the README and the docs guides runs, on CPU, as a reader would run it.

The blocks of one page run in order in one shared namespace (a page may build on its earlier
blocks), from a temporary working directory. A block whose first line is a `>>>` prompt runs as
a doctest, so its printed output is checked too. A block that cannot run on a CPU-only machine is
skipped by putting `<!-- docs-test: skip -->` on the line just before its opening fence.
"""

from __future__ import annotations

import doctest
import re
import textwrap
import traceback
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
SKIP_MARKER = "<!-- docs-test: skip -->"
_OPENING = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*(?P<info>[^`\n]*)$")
_RUNNABLE = {"python", "py"}
_HOW_TO_FIX = (
    "Every ```python block in docs/ runs as a test (tests/test_docs.py): the blocks of a page in "
    "order, sharing one namespace, on a CPU-only machine, with warnings turned into errors. Fix "
    f"the block, or, if it cannot run without an accelerator, put `{SKIP_MARKER}` on the line "
    "just before its opening fence."
)


@dataclass(frozen=True)
class Block:
    page: Path
    line: int  # 1-based line of the first line of code, in the Markdown file
    code: str
    skipped: bool

    @property
    def where(self) -> str:
        shown = self.page.relative_to(ROOT) if self.page.is_relative_to(ROOT) else self.page.name
        return f"{shown}, the python block at line {self.line}"


def extract_blocks(page: Path) -> list[Block]:
    """The fenced python blocks of a Markdown page, with the line where each one's code starts."""
    lines = page.read_text(encoding="utf-8").splitlines()
    blocks = []
    index = 0
    while index < len(lines):
        opening = _OPENING.match(lines[index])
        if opening is None:
            index += 1
            continue
        fence, indent = opening["fence"], opening["indent"]
        language = opening["info"].strip().split(" ")[0].lstrip(".{").rstrip("}").lower()
        end = index + 1
        while end < len(lines) and not (
            lines[end].strip().startswith(fence) and lines[end].strip().strip(fence[0]) == ""
        ):
            end += 1
        if language in _RUNNABLE:
            body = [line[len(indent) :] if line.startswith(indent) else line for line in lines]
            previous = next((line.strip() for line in reversed(lines[:index]) if line.strip()), "")
            blocks.append(
                Block(
                    page=page,
                    line=index + 2,
                    code=textwrap.dedent("\n".join(body[index + 1 : end])),
                    skipped=previous == SKIP_MARKER,
                )
            )
        index = end + 1
    return blocks


def run_block(block: Block, namespace: dict[str, object]) -> None:
    if block.code.lstrip().startswith(">>>"):
        test = doctest.DocTestParser().get_doctest(
            block.code, namespace, block.where, str(block.page), block.line - 1
        )
        runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
        report: list[str] = []
        runner.run(test, out=report.append, clear_globs=False)
        if runner.failures:
            raise AssertionError("".join(report))
        return
    # Pad with blank lines so that tracebacks give the line number in the Markdown file.
    source = "\n" * (block.line - 1) + block.code
    exec(compile(source, str(block.page), "exec"), namespace)


def pages() -> list[Path]:
    return [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]


@pytest.mark.parametrize("page", [p for p in pages() if extract_blocks(p)], ids=lambda p: p.name)
def test_page_code_blocks_run(page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DEVICEKIT_DEVICE", raising=False)
    namespace: dict[str, object] = {"__name__": f"docs_{page.stem.replace('-', '_')}"}
    try:
        for block in extract_blocks(page):
            if block.skipped:
                continue
            try:
                run_block(block, namespace)
            except Exception as error:
                details = "".join(traceback.format_exception_only(error)).strip()
                pytest.fail(
                    f"{block.where} failed: {details}\n\n"
                    f"{textwrap.indent(block.code, '    ')}\n\n{_HOW_TO_FIX}",
                    pytrace=True,
                )
    finally:
        torch.set_default_device(None)


def test_extract_blocks_finds_code_line_numbers_and_skips(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "# Title\n"
        "\n"
        "```python\n"
        "x = 1\n"
        "```\n"
        "\n"
        "```bash\n"
        "make run\n"
        "```\n"
        f"{SKIP_MARKER}\n"
        "```python\n"
        "torch.cuda.init()\n"
        "```\n"
        "- a list item:\n"
        "\n"
        "    ```py\n"
        "    if x:\n"
        "        y = 2\n"
        "    ```\n",
        encoding="utf-8",
    )
    blocks = extract_blocks(page)
    assert [(b.line, b.code, b.skipped) for b in blocks] == [
        (4, "x = 1", False),
        (12, "torch.cuda.init()", True),
        (17, "if x:\n    y = 2", False),
    ]
    assert blocks[0].where == "page.md, the python block at line 4"


def test_failing_block_reports_the_markdown_line(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("intro\n\n```python\na = 1\nb = a / 0\n```\n", encoding="utf-8")
    (block,) = extract_blocks(page)
    with pytest.raises(ZeroDivisionError) as info:
        run_block(block, {})
    assert info.traceback[-1].lineno + 1 == 5  # pytest's line numbers are 0-based
    assert Path(info.traceback[-1].path) == page


def test_doctest_blocks_check_their_output(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("```python\n>>> 1 + 1\n3\n```\n", encoding="utf-8")
    (block,) = extract_blocks(page)
    with pytest.raises(AssertionError, match=r"Expected:\s+3\s+Got:\s+2"):
        run_block(block, {})
    page.write_text("```python\n>>> 1 + 1\n2\n```\n", encoding="utf-8")
    (block,) = extract_blocks(page)
    run_block(block, {})
