"""The README's configuration reference is the one the code documents."""

from __future__ import annotations

import re

from daemon.config import reference_markdown
from tests.conftest import REPO

START, END = "<!-- config-reference:start -->", "<!-- config-reference:end -->"


def readme_reference() -> str:
    text = (REPO / "README.md").read_text()
    match = re.search(re.escape(START) + r"\n(.*?)\n?" + re.escape(END), text, re.S)
    assert match, "README.md lost its configuration reference markers"
    return match.group(1).strip()


def test_readme_configuration_reference_is_current() -> None:
    assert readme_reference() == reference_markdown().strip(), (
        "README.md's configuration table is stale: run `python -m tests.test_docs` to regenerate it"
    )


def update_readme() -> None:
    path = REPO / "README.md"
    text = path.read_text()
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    path.write_text(f"{head}{START}\n{reference_markdown().strip()}\n{END}{tail}")


if __name__ == "__main__":
    update_readme()
