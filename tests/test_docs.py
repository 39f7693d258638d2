"""The documentation sources cover the package: every public name has an API
entry, every example script a section, every page with Python blocks a test.

The build itself (``make -C docs html``, warnings as errors) runs in .ci/run;
these checks read the sources only, so they are fast and need no Sphinx.
"""

import importlib
import pkgutil
import re
from pathlib import Path

import pytest
from test_readme import DOC_PAGES

import skstego

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
API = DOCS / "api"

_DIRECTIVE = re.compile(r"^\.\. ([\w:-]+)::\s*(.*)$")


def _autosummary_entries(text: str) -> list[str]:
    """Full names listed in the ``autosummary`` tables of one .rst source."""
    entries = []
    module = None
    in_table = False
    for line in text.splitlines():
        directive = _DIRECTIVE.match(line)
        if directive:
            name, argument = directive.groups()
            if name in ("currentmodule", "py:currentmodule", "module", "py:module"):
                module = argument.strip()
            in_table = name == "autosummary"
            continue
        if not in_table:
            continue
        if line and not line[0].isspace():
            in_table = False  # dedent: the table ended
            continue
        item = line.strip()
        if not item or item.startswith(":"):
            continue  # blank line or directive option
        item = item.lstrip("~")
        entries.append(item if module is None else f"{module}.{item}")
    return entries


def _documented() -> list[str]:
    return [
        entry
        for page in sorted(API.glob("*.rst"))
        for entry in _autosummary_entries(page.read_text())
    ]


def _resolve(fullname: str):
    """The object a dotted name names: the longest importable module, then
    attributes."""
    parts = fullname.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(fullname)


def _public_modules() -> list[str]:
    """skstego and each public (sub)module of it that declares ``__all__``."""
    names = ["skstego"]
    for info in pkgutil.walk_packages(skstego.__path__, "skstego."):
        if any(part.startswith("_") for part in info.name.split(".")):
            continue
        module = importlib.import_module(info.name)
        if hasattr(module, "__all__"):
            names.append(info.name)
    return names


def test_autosummary_parser_reads_tables_and_modules():
    text = (
        "Title\n=====\n\n.. currentmodule:: pkg.sub\n\n"
        ".. autosummary::\n   :toctree: generated\n   :nosignatures:\n\n"
        "   Alpha\n   ~mod.beta\n\nProse that is not an entry.\n\n"
        ".. autosummary::\n\n   gamma\n"
    )
    assert _autosummary_entries(text) == [
        "pkg.sub.Alpha",
        "pkg.sub.mod.beta",
        "pkg.sub.gamma",
    ]


def test_public_modules_include_the_known_areas():
    modules = _public_modules()
    for name in (
        "skstego",
        "skstego.features",
        "skstego.projection",
        "skstego.probes",
        "skstego.losses",
        "skstego.metrics",
        "skstego.datasets",
    ):
        assert name in modules


@pytest.mark.parametrize("module_name", _public_modules())
def test_every_public_name_has_an_api_entry(module_name):
    module = importlib.import_module(module_name)
    documented = _documented()
    by_name: dict[str, list] = {}
    for entry in documented:
        by_name.setdefault(entry.rsplit(".", 1)[-1], []).append(_resolve(entry))
    missing = [
        name
        for name in module.__all__
        if not name.startswith("__")
        and not any(obj is getattr(module, name) for obj in by_name.get(name, []))
    ]
    assert not missing, (
        f"{module_name}.__all__ names missing from the autosummary tables of "
        f"docs/api/*.rst: {missing}. Add them to the page of their area."
    )


def test_api_entries_name_existing_objects():
    for entry in _documented():
        _resolve(entry)  # raises ImportError / AttributeError on a stale entry


def test_every_example_script_is_on_the_examples_page():
    page = (DOCS / "examples.rst").read_text()
    shown = set(re.findall(r"^\.\. example-script:: (\S+)$", page, flags=re.M))
    scripts = {path.name for path in (ROOT / "examples").glob("*.py")}
    assert scripts, "no example scripts found"
    missing = sorted(scripts - shown)
    assert not missing, f"examples missing from docs/examples.rst: {missing}"


def test_every_page_with_python_blocks_runs_in_the_tests():
    pages = {
        path.relative_to(DOCS).as_posix()
        for path in DOCS.rglob("*.md")
        if "_build" not in path.parts and "```python\n" in path.read_text()
    }
    assert pages, "no documentation page has Python blocks"
    assert pages <= set(DOC_PAGES), (
        "pages with Python blocks not executed by tests/test_readme.py: "
        f"{sorted(pages - set(DOC_PAGES))}"
    )
