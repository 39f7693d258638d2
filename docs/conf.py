"""Sphinx configuration for skstego's documentation.

Build with ``make -C docs html`` (warnings are errors). Everything works
offline: no intersphinx, no gallery execution, a theme installed from PyPI.
"""

from __future__ import annotations

import ast
import importlib
import os
import pkgutil
import re
import sys
from pathlib import Path

from docutils import nodes
from docutils.statemachine import StringList
from sphinx.pycode import ModuleAnalyzer
from sphinx.util.docutils import SphinxDirective

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
EXAMPLES = ROOT / "examples"
sys.path.insert(0, str(ROOT))
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
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]
templates_path = ["_templates"]

# Markdown pages: GitHub-style anchors for "#heading" links, tables, colons.
myst_heading_anchors = 3
myst_enable_extensions = ["colon_fence"]

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

# No intersphinx: the build must not reach the network.

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


class ExampleScript(SphinxDirective):
    """``.. example-script:: name.py``: an example's docstring, then its source.

    The description is the script's module docstring (reStructuredText), so it
    is written once, in the script; the source follows with line numbers and
    a download link. Nothing is executed.
    """

    required_arguments = 1

    def run(self):
        name = self.arguments[0]
        path = EXAMPLES / name
        if not path.is_file():
            raise self.error(f"example-script: no file examples/{name}")
        self.env.note_dependency(str(path))
        docstring = ast.get_docstring(ast.parse(path.read_text())) or ""
        rst = [
            *docstring.splitlines(),
            "",
            f"Source: :download:`examples/{name} </../examples/{name}>`",
            "",
            f".. literalinclude:: /../examples/{name}",
            "   :language: python",
            "   :linenos:",
        ]
        node = nodes.container()
        self.state.nested_parse(StringList(rst, source=str(path)), 0, node)
        return node.children


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


def setup(app):
    app.add_directive("example-script", ExampleScript)
    app.add_directive("cli-help", CliHelp)
    app.connect("autodoc-skip-member", _skip_member)
    # before numpydoc (priority 500) parses the lines
    app.connect("autodoc-process-docstring", _data_docstring, priority=400)
    app.connect("autodoc-process-docstring", _escape_trailing_underscores, priority=450)
