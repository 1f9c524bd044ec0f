"""docs/: every `digitkit ...` command a page shows parses with the real parser, every picture it shows exists and
is small, every output excerpt was filled by docs/build.py, and the README links every page."""

import re
import shlex

import pytest

from digitkit.cli import build_parser
from digitkit.completion import walk

from .conftest import ROOT

DOCS = ROOT / "docs"
PAGES = sorted(DOCS.glob("*.md"))
TASKS = ("train", "evaluate", "realworld", "serve", "export", "scale", "retrain", "studies")


def command_lines(text: str) -> list[str]:
    """`digitkit ...` lines of code blocks (a leading `$ ` removed) and inline code spans."""
    lines = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, re.S):
        for line in block.splitlines():
            line = line.strip().removeprefix("$ ")
            if line.startswith("digitkit "):
                lines.append(line)
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    names = set(walk(build_parser()))  # `digitkit export` in a sentence names a command; it is not one to run
    lines += [span for span in re.findall(r"`([^`\n]+)`", prose)
              if span.startswith("digitkit ") and span.removeprefix("digitkit ") not in names]  # fmt: skip
    return lines


def test_there_is_a_page_per_task():
    assert {p.stem for p in PAGES} >= set(TASKS)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_command_shown_parses(page):
    lines = command_lines(page.read_text(encoding="utf-8"))
    assert len(lines) >= 3, f"{page.name} shows hardly any commands"
    for line in lines:
        argv = shlex.split(line, comments=True)
        if ">" in argv:
            argv = argv[: argv.index(">")]
        try:
            build_parser().parse_args(argv[1:])
        except SystemExit:
            pytest.fail(f"{page.name}: `{line}` does not parse")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_pictures_exist_and_output_excerpts_are_filled(page):
    text = page.read_text(encoding="utf-8")
    for ref in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text):
        path = DOCS / ref
        assert path.is_file(), f"{page.name}: {ref} is missing; run python docs/build.py"
        assert path.stat().st_size < 150_000, f"{ref}: {path.stat().st_size:,} bytes; keep pictures small"
    for name, body in re.findall(r"<!-- output: ([\w-]+) -->\n(.*?)<!-- /output -->", text, re.S):
        assert body.startswith("```text\n$ "), f"{page.name}: excerpt {name} is empty; run python docs/build.py"


def test_docs_pictures_stay_small_and_the_readme_links_every_page():
    total = sum(p.stat().st_size for p in (DOCS / "img").glob("*"))
    assert total < 1_500_000, f"docs/img holds {total:,} bytes"
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for task in TASKS:
        assert f"(docs/{task}.md)" in readme, f"README does not link docs/{task}.md"
