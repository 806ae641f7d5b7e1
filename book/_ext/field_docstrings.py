"""Sphinx extension: read a field's docstring as prose, not as napoleon's ``type: description``.

The package documents dataclass fields and module constants CleanRL-style, one sentence under
the field (``beta: float = 0.0`` / ``\"\"\"β: weight of the KL loss; 0–0.1\"\"\"``).  Napoleon reads
the text before the first colon of such a docstring as the field's *type*, which renders
"β" as a type and fails the nitpicky build.  This handler runs just before napoleon and puts an
empty type in front (``": β: weight …"``), so napoleon keeps the whole sentence as the
description; the real type still comes from the annotation.
"""

from __future__ import annotations


def _prose_field_docstring(app, what, name, obj, options, lines) -> None:
    if what in ("attribute", "data") and lines and ":" in lines[0]:
        lines[0] = ": " + lines[0]


def setup(app):
    # napoleon connects at the default priority 500; a lower number runs first
    app.connect("autodoc-process-docstring", _prose_field_docstring, priority=400)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
