"""The docs, configs and scripts describe the product as it is: no working sessions, no
issue numbers. History belongs in the git log.

Checked: README.md, docs/ (Markdown, outside the kept run records in docs/runs/),
configs/ and scripts/. Data files (JSON, JSONL, PNG) are records of what ran, and are
left as they were written.
"""

import pathlib
import re

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
DATA_SUFFIXES = {".json", ".jsonl", ".png", ".gz", ".npz", ".msgpack"}
FORBIDDEN = {
    "the word 'session'": re.compile(r"session", re.IGNORECASE),
    "an issue number": re.compile(r"\bissues?\s*#?\s*\d+|(?<![\w&#/$])#\d+\b", re.IGNORECASE),
}


def checked_files() -> list[pathlib.Path]:
    files = [REPO / "README.md"]
    files += [
        p for p in (REPO / "docs").rglob("*.md") if "runs" not in p.relative_to(REPO / "docs").parts
    ]
    for folder in ("configs", "scripts"):
        files += [
            p
            for p in (REPO / folder).rglob("*")
            if p.is_file() and p.suffix not in DATA_SUFFIXES and "__pycache__" not in p.parts
        ]
    return sorted(files)


def test_the_checked_files_are_the_docs_configs_and_scripts():
    names = {str(p.relative_to(REPO)) for p in checked_files()}
    assert {"README.md", "docs/results.md", "docs/models.md", "docs/benchmarks.md"} <= names
    assert {"configs/README.md", "configs/train_nin.py", "scripts/paper_zoo.sh"} <= names
    assert not any(name.startswith("docs/runs/") or name.endswith(".json") for name in names)


@pytest.mark.parametrize("what", sorted(FORBIDDEN))
def test_no_file_speaks_of_sessions_or_issue_numbers(what):
    pattern = FORBIDDEN[what]
    hits = []
    for path in checked_files():
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if pattern.search(line):
                hits.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert not hits, f"{len(hits)} lines with {what}:\n" + "\n".join(hits[:40])


def test_the_patterns_catch_what_they_are_for():
    issue = FORBIDDEN["an issue number"]
    for text in ("issue 16", "Issue 14's runs", "issue #2", "(#16)", "see #16", "issues 14"):
        assert issue.search(text), text
    for text in ("${#workdirs[@]}", "color #fff", "$#", "&#39;", "a 16-image issue"):
        assert not issue.search(text), text
    assert FORBIDDEN["the word 'session'"].search("Sessions 9-19")
