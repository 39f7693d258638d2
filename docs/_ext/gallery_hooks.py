"""sphinx-gallery hooks for skstego's examples (used by docs/conf.py).

The example scripts are plain command-line programs: they take ``--quick``
and ``--out DIR`` and write their figures as files (``save_sweep_figures``
closes its figures), so matplotlib's scraper finds nothing. These hooks run
each script in its quick mode with ``--out`` pointing into the build folder
and show every PNG the script wrote there, block by block.

They are named in ``sphinx_gallery_conf`` by their fully qualified names
(strings), so that the configuration stays picklable.
"""

from __future__ import annotations

import shutil
from pathlib import Path

#: The order of the examples on the gallery page (others follow by name).
ORDER = (
    "quickstart.py",
    "plot_dimension_sweep.py",
    "plot_mechanisms.py",
    "scale_out.py",
)

#: Command-line arguments of each executed example, besides ``--out``.
ARGUMENTS = {
    "plot_dimension_sweep.py": ["--quick"],
    "plot_mechanisms.py": ["--quick"],
}

#: Examples whose ``--out`` names a file rather than a folder.
OUT_FILE = {"quickstart.py": "quickstart.png"}

# PNGs already shown, per example: each block shows only the new ones.
_shown: dict[str, set[Path]] = {}


#: Where executed examples write their files (set by docs/conf.py).
OUT_ROOT = Path(__file__).resolve().parents[1] / "_build" / "gallery_out"


def out_dir(src_file: str | Path) -> Path:
    """The folder an executed example writes its figures to."""
    return OUT_ROOT / Path(src_file).stem


def reset_argv(gallery_conf, script_vars) -> list[str]:
    """``sys.argv[1:]`` of an executed example: quick mode, figures to its
    :func:`out_dir` (emptied first)."""
    src = Path(script_vars["src_file"])
    folder = out_dir(src)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    _shown[str(src)] = set()
    out = folder / OUT_FILE[src.name] if src.name in OUT_FILE else folder
    return [*ARGUMENTS.get(src.name, []), "--out", str(out)]


def png_scraper(block, block_vars, gallery_conf, **kwargs) -> str:
    """Show the PNGs the example wrote during this block."""
    from sphinx_gallery.scrapers import figure_rst

    src = str(block_vars["src_file"])
    folder = out_dir(src)
    if src not in _shown or not folder.is_dir():
        return ""
    new = sorted(set(folder.rglob("*.png")) - _shown[src])
    _shown[src].update(new)
    images = []
    for png, target in zip(new, block_vars["image_path_iterator"], strict=False):
        shutil.copyfile(png, target)
        images.append(target)
    return figure_rst(images, gallery_conf["src_dir"])


def with_title(text: str) -> str:
    """The script with the first line of its docstring as a reST title.

    sphinx-gallery takes an example's title from a section title in its
    docstring; the scripts' docstrings open with a plain sentence, which
    also serves as their ``--help`` description. Scripts that have a title
    are returned unchanged.
    """
    head, quote, rest = text.partition('"""')
    first, newline, body = rest.partition("\n")
    title = first.strip()
    if not quote or not title or body.lstrip(" ").startswith(("=", "-")):
        return text
    return f"{head}{quote}{title}\n{'=' * len(title)}{newline}{body}"


def stage_examples(folders: dict[Path, Path], header: Path) -> None:
    """Copy each source folder's scripts (with :func:`with_title`) and its
    ``GALLERY_HEADER.rst`` (``header`` where it has none) to its target.

    Unchanged copies are left alone (sphinx-gallery then reuses their
    output); copies of deleted scripts are removed.
    """
    for source, target in folders.items():
        target.mkdir(parents=True, exist_ok=True)
        wanted = {p.name: with_title(p.read_text()) for p in source.glob("*.py")}
        own = source / "GALLERY_HEADER.rst"
        wanted["GALLERY_HEADER.rst"] = (own if own.is_file() else header).read_text()
        for stale in target.iterdir():
            if stale.is_file() and stale.name not in wanted:
                stale.unlink()
        for name, text in wanted.items():
            path = target / name
            if not path.is_file() or path.read_text() != text:
                path.write_text(text)


class ExampleOrder:
    """``within_subsection_order``: the examples in :data:`ORDER`."""

    def __init__(self, src_dir: str) -> None:
        self.src_dir = src_dir

    def __call__(self, filename: str) -> tuple[int, str]:
        name = Path(filename).name
        return (ORDER.index(name) if name in ORDER else len(ORDER), name)

    def __repr__(self) -> str:
        return f"<{type(self).__name__}>"
