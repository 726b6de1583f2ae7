"""docs/PNNH.md section 2.2 lists the PNNH design space as built: one row per CoderSpec field,
with its default and its choices."""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from pnnh.models.layers import CODER_FORMS, CODER_INITS, CODER_NORMS, FUSIONS, SHARINGS, CoderSpec

DOC = Path(__file__).resolve().parents[1] / "docs" / "PNNH.md"
CHOICES = {"sharing": SHARINGS, "init": CODER_INITS, "form": CODER_FORMS, "fusion": FUSIONS, "norm": CODER_NORMS,
           "kernel": (1, 3), "trainable": (True, False)}


def documented_rows() -> dict[str, tuple[str, str]]:
    """``{field: (default text, choices text)}`` from the table between the coder-defaults markers."""
    text = DOC.read_text()
    table = text[text.index("<!-- coder-defaults"):text.index("<!-- end coder-defaults -->")]
    rows = {}
    for line in table.splitlines():
        match = re.match(r"\| `coder_(\w+)` \| ([^|]+) \| ([^|]+) \|", line)
        if match:
            rows[match[1]] = (match[2].strip(), match[3].strip())
    return rows


def as_text(value) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def test_every_coder_field_is_documented_with_its_default():
    rows, defaults = documented_rows(), CoderSpec()
    assert set(rows) == {f.name for f in dataclasses.fields(CoderSpec)}
    for name, (default, _) in rows.items():
        assert default == as_text(getattr(defaults, name)), name


def test_documented_choices_are_the_valid_ones():
    rows = documented_rows()
    for name, valid in CHOICES.items():
        assert [c.strip() for c in rows[name][1].split(",")] == [as_text(v) for v in valid], name
