"""Sphinx configuration for skstego's documentation.

Build with ``make -C docs html`` (warnings and broken cross-references are
errors). Everything works offline: no intersphinx (its inventories would be
downloaded), a theme installed from PyPI. sphinx-gallery runs the examples in
their quick mode (a few minutes on two CPU cores); ``make -C docs html
SPHINXOPTS="-D plot_gallery=0"`` skips running them.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
import re
import sys
from pathlib import Path

from docutils import nodes
from sphinx.pycode import ModuleAnalyzer
from sphinx.util.docutils import SphinxDirective

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
EXAMPLES = ROOT / "examples"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(DOCS / "_ext"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

import skstego  # noqa: E402

project = "skstego"
author = "skstego developers"
copyright = "skstego developers"
release = skstego.__version__
version = ".".join(release.split(".")[:2])

extensions = [
    "myst_parser",
    "numpydoc",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "sphinx_copybutton",
    "sphinx_gallery.gen_gallery",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "_ext", "plotting_examples", "Thumbs.db", ".DS_Store"]
templates_path = ["_templates"]

# Markdown pages: GitHub-style anchors for "#heading" links, tables, colons.
myst_heading_anchors = 3
myst_enable_extensions = ["colon_fence"]
# The landing page and the guides link GitHub pages, the papers and the
# reference implementations; the site itself is built offline.
myst_url_schemes = ["http", "https", "mailto"]

# API reference: autosummary writes one stub page per public name into
# docs/api/generated (ignored by git, rebuilt at every build).
# The pages are listed explicitly: with ``True``, an incremental build misses
# the tables of a page added since the last build.
autosummary_generate = sorted(
    path.relative_to(DOCS).as_posix() for path in (DOCS / "api").glob("*.rst")
)
autosummary_imported_members = False
autodoc_typehints = "none"  # numpydoc docstrings already give the types
numpydoc_show_class_members = False
numpydoc_class_members_toctree = False
numpydoc_xref_param_type = False

# No intersphinx: the build must not reach the network, and the inventories
# of scikit-learn, torch, numpy, dask and timm would have to be downloaded.
# Names of those libraries in docstrings stay plain text (nitpick_ignore below).

# Broken cross-references fail the build (with -W). Every skstego name must
# resolve; third-party names cannot without intersphinx, so they are listed
# here, by library. Nothing of skstego's own belongs in these lists.
nitpicky = True
nitpick_ignore_regex = [
    # scikit-learn, torch, numpy, scipy, pandas, dask, zarr, PIL, timm,
    # matplotlib, hnne, faiss and the standard library: documented on their
    # own sites, linked only through intersphinx (not used: see above).
    (
        r"py:.*",
        r"(sklearn|torch|numpy|np|scipy|pandas|pd|dask|distributed|zarr|PIL"
        r"|timm|matplotlib|hnne|faiss|argparse|os|pathlib|typing|collections)"
        r"(\..*)?",
    ),
]

# Copy buttons copy commands, not prompts or output.
copybutton_prompt_text = r">>> |\.\.\. |\$ "
copybutton_prompt_is_regexp = True
copybutton_exclude = ".linenos, .gp, .go"

# The examples gallery: the scripts of examples/ (run in their quick mode,
# showing the PNGs they write; scale_out.py needs Dask workers and is shown,
# not run), then docs/plotting_examples (figures of every plotting function,
# for the API pages). sphinx-gallery needs a GALLERY_HEADER.rst beside the
# scripts and a reST title in each docstring: both are added to copies in the
# build folder, so that examples/ holds only runnable scripts
# (docs/_ext/gallery_hooks.py).
from gallery_hooks import stage_examples  # noqa: E402

GALLERY_SRC = DOCS / "_build" / "gallery_src"
stage_examples(
    {EXAMPLES: GALLERY_SRC, DOCS / "plotting_examples": GALLERY_SRC / "plotting"},
    header=DOCS / "_ext" / "GALLERY_HEADER.rst",
)

sphinx_gallery_conf = {
    "examples_dirs": [os.path.relpath(GALLERY_SRC, DOCS)],
    "gallery_dirs": ["examples"],
    "filename_pattern": r"/(plot_|quickstart)",
    "within_subsection_order": "gallery_hooks.ExampleOrder",
    "reset_argv": "gallery_hooks.reset_argv",
    "image_scrapers": ("matplotlib", "gallery_hooks.png_scraper"),
    "doc_module": ("skstego",),
    "reference_url": {"skstego": None},
    "backreferences_dir": "api/generated/backreferences",
    "inspect_global_variables": False,
    "remove_config_comments": True,
    "download_all_examples": False,
    "show_memory": False,
    "min_reported_time": 1,
    "capture_repr": (),
}

html_theme = "furo"
html_title = f"skstego {release}"
html_static_path: list[str] = []


# scikit-learn adds ``set_<method>_request`` methods for metadata routing to
# every estimator class; they are scikit-learn's API, documented there.
_SKLEARN_REQUEST = re.compile(r"^set_\w+_request$")


def _skip_member(app, what, name, obj, skip, options):
    """Class pages show the members skstego defines, its mixins' included;
    members inherited from scikit-learn are documented by scikit-learn."""
    if _SKLEARN_REQUEST.match(name):
        return True
    if what == "class":
        target = obj.fget if isinstance(obj, property) else obj
        module = getattr(target, "__module__", None) or ""
        if module and not module.startswith("skstego"):
            return True
    return None


def _data_docstring(app, what, name, obj, options, lines):
    """Document constants by their ``#:`` comment, never by their type's docstring.

    ``skstego.datasets.COCOSTUFF27_CLASSES`` is defined in a private module;
    autodoc looks for the comment in the public one and otherwise shows the
    docstring of ``list`` or ``ndarray``.
    """
    if what != "data":
        return
    package, attr = name.rsplit(".", 1)
    modules = [importlib.import_module(package)]
    if hasattr(modules[0], "__path__"):
        modules += [
            importlib.import_module(f"{package}.{info.name}")
            for info in pkgutil.iter_modules(modules[0].__path__)
        ]
    for module in modules:
        docs = ModuleAnalyzer.for_module(module.__name__).find_attr_docs()
        if ("", attr) in docs:
            lines[:] = list(docs["", attr])
            return
    lines[:] = []


# A bare word ending in an underscore (``n_features_in_``, as scikit-learn
# writes shapes: "ndarray of shape (n_components_, n_features_in_)") is a
# hyperlink reference in reStructuredText. Escape such words outside literals
# and outside the name of a "name : type" line, which numpydoc handles.
_QUOTED = re.compile(r"(``.*?``|`[^`]*`)")
_TRAILING_UNDERSCORE = re.compile(r"\b([A-Za-z]\w*?)_(?=[\s,.;:)\]}]|$)")
_NAME_TYPE = re.compile(r"^(\s*[\w*, ]+ : )(.*)$")


def _escape_words(text):
    parts = _QUOTED.split(text)
    for i in range(0, len(parts), 2):  # even parts are outside quotes
        parts[i] = _TRAILING_UNDERSCORE.sub(r"\1\\_", parts[i])
    return "".join(parts)


def _escape_trailing_underscores(app, what, name, obj, options, lines):
    block_indent = None  # indent of the line that opened a literal block
    in_doctest = False
    for i, line in enumerate(lines):
        stripped = line.lstrip()
        indent = len(line) - len(stripped)
        if in_doctest:
            in_doctest = bool(stripped)  # a doctest runs to the next blank line
            continue
        if block_indent is not None:
            if not stripped or indent > block_indent:
                continue  # inside a literal block or directive
            block_indent = None
        if stripped.startswith(">>>"):
            in_doctest = True
            continue
        match = _NAME_TYPE.match(line)
        if match:
            lines[i] = match.group(1) + _escape_words(match.group(2))
        else:
            lines[i] = _escape_words(line)
        if stripped.endswith("::"):
            block_indent = indent


class CliHelp(SphinxDirective):
    """``.. cli-help:: [COMMAND]``: the command line's own ``--help`` text, so
    the option reference cannot drift from the parser."""

    optional_arguments = 1

    def run(self):
        from skstego.cli import _parser

        parser = _parser()
        if self.arguments:
            commands = next(
                a for a in parser._actions if type(a).__name__ == "_SubParsersAction"
            )
            parser = commands.choices[self.arguments[0]]
        saved = os.environ.get("COLUMNS")
        os.environ["COLUMNS"] = "88"
        try:
            text = parser.format_help()
        finally:
            if saved is None:
                os.environ.pop("COLUMNS", None)
            else:
                os.environ["COLUMNS"] = saved
        return [nodes.literal_block(text, text)]


def _documented_name(env, name: str) -> str | None:
    """The documented full name of ``skstego.<name>``, a top-level re-export.

    The API pages document each estimator under the subpackage that defines
    it (``skstego.probes.KMeansProbe``); users and docstrings write the
    top-level name (``skstego.KMeansProbe``) or, in numpydoc's See Also, the
    bare name (``KMeansProbe``).
    """
    if name not in skstego.__all__:
        return None
    obj = getattr(skstego, name)
    for full in env.get_domain("py").objects:
        package, _, last = full.rpartition(".")
        if last == name and package.count(".") == 1 and package != "skstego":
            if getattr(importlib.import_module(package), name, None) is obj:
                return full
    return None


def _resolve_public_alias(app, env, node, contnode):
    """Resolve ``skstego.X[.attr]`` and bare ``X[.attr]`` for X in
    ``skstego.__all__`` to the page that documents X; anything else stays
    unresolved (and fails the nitpicky build)."""
    if node.get("refdomain") != "py":
        return None
    head, _, tail = node["reftarget"].removeprefix("skstego.").partition(".")
    full = _documented_name(env, head)
    if full is None:
        return None
    target = f"{full}.{tail}" if tail else full
    return env.get_domain("py").resolve_xref(
        env, node["refdoc"], app.builder, node["reftype"], target, node, contnode
    )


def _without_gallery_run(app, config):
    """``-D plot_gallery=0`` runs no example, so the figures they make (the
    landing page's among them) are missing: not an error then."""
    if str(config.plot_gallery).lower() in ("0", "false", "no", "off"):
        config.suppress_warnings = [*config.suppress_warnings, "image.not_readable"]


def setup(app):
    app.connect("config-inited", _without_gallery_run, priority=900)
    app.connect("missing-reference", _resolve_public_alias)
    app.add_directive("cli-help", CliHelp)
    app.connect("autodoc-skip-member", _skip_member)
    # before numpydoc (priority 500) parses the lines
    app.connect("autodoc-process-docstring", _data_docstring, priority=400)
    app.connect("autodoc-process-docstring", _escape_trailing_underscores, priority=450)
