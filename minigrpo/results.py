"""The committed results the chapters draw on: ``benchmarks/results/*.json``.

    from minigrpo.results import committed
    headline = committed("arithmetic_headline.json")

Read from the repository checkout when the package is installed from one (``pip install -e .``),
else (Colab, a wheel) from the repository on GitHub.
"""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent.parent / "benchmarks" / "results"
RESULTS_URL = "https://raw.githubusercontent.com/minigrpo/minigrpo/main/benchmarks/results/"


def committed(name: str) -> dict:
    """The committed result ``benchmarks/results/<name>``, parsed."""
    path = RESULTS_DIR / name
    if path.exists():
        return json.loads(path.read_text())
    with urllib.request.urlopen(RESULTS_URL + name, timeout=30) as f:
        return json.load(f)
