"""README and docs/ keep up with the code: every setting on the generated settings page, CI
runs the README's test command, README stays an entry that links its pages."""

from __future__ import annotations

import re

from conftest import REPO
from shared.settings import Settings
from shared.settings_doc import PAGE, render

README = (REPO / "README.md").read_text()
PAGES = ("deployment", "security", "async", "cross-device", "privacy", "monitoring", "operations", "settings")


def test_the_settings_page_is_generated_from_settings() -> None:
    assert PAGE.read_text() == render(), "run: python -m shared.settings_doc > docs/settings.md"
    documented = set(re.findall(r"^\| `([A-Z0-9_]+)`", PAGE.read_text(), re.M))
    assert {n.upper() for n in Settings.model_fields} == documented


def test_readme_gives_the_two_set_up_commands_and_ci_runs_the_test_one() -> None:
    blocks = re.findall(r"```bash\n(.*?)```", README, re.S)
    assert any(b.strip() == "docker compose up --build --scale client=3" for b in blocks)
    test_command = next(b.strip() for b in blocks if "pytest" in b)
    assert test_command in (REPO / ".ci" / "run").read_text()


def test_readme_is_an_entry_that_links_every_page() -> None:
    assert len(README.splitlines()) <= 300
    for page in PAGES:
        assert f"(docs/{page}.md)" in README and (REPO / "docs" / f"{page}.md").is_file(), page
