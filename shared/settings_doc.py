"""docs/settings.md, generated from `Settings`: one row per field, from its declaration (default,
the accepted values that bad-value messages quote, what it defines). Never edited by hand:

    python -m shared.settings_doc > docs/settings.md

tests/test_docs.py fails when the committed page is not what this prints."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from shared.settings import Settings, _marks

INTRO = """# Settings

Generated from `Settings` in `shared/settings.py` by `python -m shared.settings_doc`; do not edit.
Back to [README](../README.md).

Every setting is an environment variable; `.env` holds them all with the defaults below, each
with a comment on what it does (an empty value means the default). The environment wins over
`.env`. A bad value stops the command with one line that quotes the "accepted" column.

"Defines" says what another value starts anew: **run** (a checkpoint is resumed only when all of
these are unchanged), **data** (shards are reused only when all of these are unchanged; they
define the run too), or nothing. "only with" names the setting a value depends on: such a
setting defines nothing while the other has another value (DIRICHLET_ALPHA without
PARTITION=dirichlet).

| variable | default | accepted | defines |
|---|---|---|---|
"""


def _default(value: Any) -> str:
    if value is None or value == "":
        return "(empty)"
    if isinstance(value, bool):
        return str(value).lower()
    return f"`{value}`"


def render() -> str:
    rows = []
    for name, field in Settings.model_fields.items():
        marks = _marks(field)
        defines = "data" if "data" in marks["defines"] else "run" if "run" in marks["defines"] else ""
        if marks.get("when") and defines:
            other, value = marks["when"]
            shown = " or ".join(str(v).lower() for v in value) if isinstance(value, list) else value
            defines += f" (only with {other.upper()}={shown})"
        accepted = (field.description or "").replace("|", "\\|")
        rows.append(f"| `{name.upper()}` | {_default(field.default)} | {accepted} | {defines} |")
    return INTRO + "\n".join(rows) + "\n"


PAGE = Path(__file__).resolve().parent.parent / "docs" / "settings.md"

if __name__ == "__main__":
    print(render(), end="")
