"""The documentation covers the package: every public name has an API entry,
every example script a gallery page, every page with Python blocks a test.

The build itself (``make -C docs html``, warnings and broken references as
errors, the gallery executed) runs in .ci/run before the tests. The checks
of the sources are fast and need no Sphinx; the checks of the built site
read ``docs/_build/html`` and are skipped when it has not been built.
"""

import ast
import importlib
import pkgutil
import re
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
from test_readme import DOC_PAGES

import skstego
import skstego.plotting

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
API = DOCS / "api"
HTML = DOCS / "_build" / "html"
sys.path.insert(0, str(DOCS / "_ext"))

import gallery_hooks  # noqa: E402

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


def _examples() -> list[Path]:
    return sorted((ROOT / "examples").glob("*.py"))


def test_every_example_script_is_in_the_gallery_order():
    scripts = {path.name for path in _examples()}
    assert scripts, "no example scripts found"
    missing = sorted(scripts - set(gallery_hooks.ORDER))
    assert not missing, f"examples missing from gallery_hooks.ORDER: {missing}"


def test_with_title_makes_the_first_docstring_line_a_title():
    script = '"""Quickstart: segment images.\n\nMore text.\n"""\nimport os\n'
    titled = gallery_hooks.with_title(script)
    title = "Quickstart: segment images."
    assert titled.startswith(f'"""{title}\n{"=" * len(title)}\n\nMore')
    assert titled.endswith("import os\n")
    assert gallery_hooks.with_title(titled) == titled  # a title stays as it is
    tour = '"""\nA tour\n======\n\nText.\n"""\n'
    assert gallery_hooks.with_title(tour) == tour


def test_staged_examples_have_titles_and_a_gallery_header(tmp_path):
    target = tmp_path / "examples"
    header = DOCS / "_ext" / "GALLERY_HEADER.rst"
    (target).mkdir()
    (target / "deleted_example.py").write_text("print(1)\n")
    gallery_hooks.stage_examples({ROOT / "examples": target}, header=header)
    staged = sorted(p.name for p in target.glob("*.py"))
    assert staged == [p.name for p in _examples()]  # the deleted one is gone
    assert (target / "GALLERY_HEADER.rst").read_text() == header.read_text()
    for path in target.glob("*.py"):
        title, underline = ast.get_docstring(ast.parse(path.read_text())).split("\n")[
            :2
        ]
        assert title and underline == "=" * len(title), path.name
    # the plotting tour has its own title and header
    tour = tmp_path / "plotting"
    gallery_hooks.stage_examples({DOCS / "plotting_examples": tour}, header=header)
    assert (tour / "GALLERY_HEADER.rst").read_text().startswith("Plotting functions")


def test_gallery_runs_the_study_scripts_quick_and_shows_their_pngs(
    tmp_path, monkeypatch
):
    monkeypatch.setattr(gallery_hooks, "OUT_ROOT", tmp_path / "out")
    src = ROOT / "examples" / "plot_mechanisms.py"
    argv = gallery_hooks.reset_argv({}, {"src_file": str(src)})
    out = tmp_path / "out" / "plot_mechanisms"
    assert argv == ["--quick", "--out", str(out)] and out.is_dir()
    quick = gallery_hooks.reset_argv({}, {"src_file": "x/quickstart.py"})
    assert quick == ["--out", str(tmp_path / "out" / "quickstart" / "quickstart.png")]

    from PIL import Image

    Image.new("RGB", (4, 3), "red").save(out / "sweep_mechanisms.png")
    (out / "sweep_mechanisms.svg").write_text("<svg/>")
    images = iter([tmp_path / "img_001.png", tmp_path / "img_002.png"])
    block_vars = {"src_file": str(src), "image_path_iterator": images}
    gallery_conf = {"src_dir": str(tmp_path)}
    rst = gallery_hooks.png_scraper(None, block_vars, gallery_conf)
    assert "img_001.png" in rst and "sweep_mechanisms" not in rst
    assert Image.open(tmp_path / "img_001.png").size == (4, 3)
    # a later block shows only the PNGs written since
    assert gallery_hooks.png_scraper(None, block_vars, gallery_conf) == ""
    Image.new("RGB", (2, 2), "blue").save(out / "sweep_miou.png")
    assert "img_002.png" in gallery_hooks.png_scraper(None, block_vars, gallery_conf)


def test_executed_examples_are_the_ones_the_gallery_pattern_matches():
    conf = (DOCS / "conf.py").read_text()
    pattern = re.search(r'"filename_pattern": r"(.*?)"', conf).group(1)
    run = {p.name for p in _examples() if re.search(pattern, f"/{p.name}")}
    # scale_out.py starts Dask worker processes: shown, not run
    assert run == {p.name for p in _examples()} - {"scale_out.py"}
    assert set(gallery_hooks.ARGUMENTS) <= run


def test_cli_reference_shows_every_subcommand():
    from skstego.cli import _parser

    (commands,) = (
        a for a in _parser()._actions if type(a).__name__ == "_SubParsersAction"
    )
    page = (API / "cli.rst").read_text()
    shown = set(re.findall(r"^\.\. cli-help:: (\S+)$", page, flags=re.M))
    assert shown == set(commands.choices)
    for name in commands.choices:
        assert f"``skstego {name}``" in page


def test_site_includes_the_changelog_and_the_benchmarks():
    index = (DOCS / "index.md").read_text()
    for page, included in [
        ("changelog", "../CHANGELOG.md"),
        ("benchmarks", "../benchmarks/RESULTS.md"),
    ]:
        assert re.search(rf"^{page}$", index, flags=re.M), page
        assert f"```{{include}} {included}" in (DOCS / f"{page}.md").read_text()
        assert (DOCS / included).resolve().is_file()


def test_guide_pages_are_in_the_toctree():
    index = (DOCS / "index.md").read_text()
    for path in sorted((DOCS / "guide").glob("*.md")):
        assert f"guide/{path.stem}" in index, path.name


def _mentions_stego_md(paths) -> list[str]:
    return [str(p.relative_to(ROOT)) for p in paths if "STEGO.md" in p.read_text()]


def test_nothing_cites_the_unpublished_stego_md():
    sources = [
        *(ROOT / "skstego").rglob("*.py"),
        *(ROOT / "examples").glob("*.py"),
        *(p for p in DOCS.rglob("*") if p.suffix in (".md", ".rst", ".py")),
        ROOT / "README.md",
    ]
    sources = [p for p in sources if "_build" not in p.parts]
    assert len(sources) > 30
    assert not _mentions_stego_md(sources)


# ---------------------------------------------------------------- built site
needs_build = pytest.mark.skipif(
    not (HTML / "index.html").is_file(),
    reason="the site is not built (make -C docs html)",
)


class _Images(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.sources: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.sources.append(dict(attrs).get("src", ""))


def _images(page: str) -> list[str]:
    path = HTML / page
    assert path.is_file(), f"the built site has no {page}"
    parser = _Images()
    parser.feed(path.read_text())
    return parser.sources


@needs_build
def test_landing_page_shows_the_quickstart_figure():
    sources = _images("index.html")
    assert any("sphx_glr_quickstart_001" in src for src in sources), sources


@needs_build
@pytest.mark.parametrize(
    "page",
    [
        "examples/quickstart.html",
        "examples/plot_dimension_sweep.html",
        "examples/plot_mechanisms.html",
        "examples/plotting/plot_plotting_tour.html",
    ],
)
def test_each_executed_example_shows_its_figures(page):
    stem = page.rsplit("/", 1)[1].removesuffix(".html")
    assert any(f"sphx_glr_{stem}_00" in src for src in _images(page))


@needs_build
def test_examples_index_has_a_thumbnail_per_example():
    thumbnails = [src for src in _images("examples/index.html") if "thumb" in src]
    assert len(thumbnails) >= len(_examples()) + 1  # + the plotting tour


@needs_build
@pytest.mark.parametrize("name", skstego.plotting.__all__)
def test_each_plotting_api_page_shows_a_figure(name):
    assert _images(f"api/generated/skstego.plotting.{name}.html"), name


@needs_build
def test_built_site_has_the_changelog_and_never_mentions_stego_md():
    changelog = (HTML / "changelog.html").read_text()
    assert "Changelog" in changelog and "Unreleased" in changelog
    assert (HTML / "benchmarks.html").is_file()
    pages = [p for p in HTML.rglob("*.html") if "_sources" not in p.parts]
    assert len(pages) > 50
    assert not _mentions_stego_md(pages)


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
