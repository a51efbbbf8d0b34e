"""README keeps up with the code: every setting documented, CI runs the README's test command."""

from __future__ import annotations

import re

from conftest import REPO
from shared.settings import Settings

README = (REPO / "README.md").read_text()


def test_every_setting_is_in_the_readme_table() -> None:
    documented = set(re.findall(r"^\| `([A-Z0-9_]+)`(?:, `([A-Z0-9_]+)`)?", README, re.M))
    names = {n for pair in documented for n in pair if n}
    assert {n.upper() for n in Settings.model_fields} - names == set()


def test_readme_gives_the_two_set_up_commands_and_ci_runs_the_test_one() -> None:
    blocks = re.findall(r"```bash\n(.*?)```", README, re.S)
    assert any(b.strip() == "docker compose up --build --scale client=3" for b in blocks)
    test_command = next(b.strip() for b in blocks if "pytest" in b)
    assert test_command in (REPO / ".ci" / "run").read_text()
