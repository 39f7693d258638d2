"""The direction of imports inside skstego (issue 16), read from the source.

Every import statement of ``skstego/**/*.py`` that names a skstego module,
at module level or inside a function, relative or absolute, is read with
:mod:`ast` (nothing is imported; imports under ``if TYPE_CHECKING:`` count
like any other). Three rules are asserted:

(a) no import cycle between skstego modules;
(b) no module imports a private name (``_x``, not ``__x__``) of a module in a
    higher layer of :data:`LAYERS`. The private name is the name the
    statement imports: ``_n`` in ``from M import _n`` (a function, a class,
    a constant or a submodule of ``M``) or the last part of ``import M._n``;
(c) no skstego import inside a function (optional third-party dependencies
    are the only imports that belong there), except the entries of
    :data:`ALLOWED_FUNCTION_IMPORTS`.

``python tests/test_architecture.py`` prints the whole picture, including
the upward imports of public names, which no rule forbids.
"""

from __future__ import annotations

import ast
import fnmatch
import itertools
import sys
from collections import defaultdict, deque
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE_DIR = Path(__file__).resolve().parents[1] / "skstego"

# Layers, top to bottom. A module belongs to the layer that names it in
# full; else to the lowest layer with a matching wildcard (``*`` also matches
# dots), so that ``probes/_x_kernels.py`` is a kernel, not an estimator. A
# subpackage's ``__init__`` is the module named after it (``skstego.probes``).
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "entry points",
        (
            "skstego",  # the public facade: imports the estimators
            "skstego.cli",
            "skstego.__main__",
            "skstego.study",
            "skstego.io",
            "skstego._stego_checkpoint",
        ),
    ),
    (
        "estimators",
        (
            "skstego.features",
            "skstego.features.*",
            "skstego.projection",
            "skstego.projection.*",
            "skstego.probes",
            "skstego.probes.*",
            "skstego.postprocess",
            "skstego.plotting",
            "skstego.datasets",
            "skstego.datasets.*",
        ),
    ),
    (
        "kernels and metrics",
        (
            "skstego.probes._kmeans_kernels",
            "skstego.probes._linear_objective",
            "skstego.*_kernels",  # any other kernel module, by its name
            "skstego.*_objective",
            "skstego.metrics",
            "skstego._cluster_metrics",
            "skstego._calibration",
            "skstego.losses",
        ),
    ),
    ("dask plumbing", ("skstego._dask",)),
    ("token access and moments", ("skstego._tokens", "skstego._moments")),
    (
        "leaf utilities",
        (
            "skstego._validation",
            "skstego._device",
            "skstego._weights",
            "skstego._precision",
            "skstego._safe_pickle",
            "skstego._version",
        ),
    ),
)

# (importing module, imported module) -> why the import must stay inside a
# function. Keep it short: each entry is a lazy import the layout could not
# avoid.
ALLOWED_FUNCTION_IMPORTS: dict[tuple[str, str], str] = {}


# --------------------------------------------------------------------------
# the checker
# --------------------------------------------------------------------------
@dataclass(frozen=True)
class Import:
    """One name imported by one statement."""

    source: str  # the importing module
    target: str  # the skstego module the name comes from (or that is imported)
    name: str  # the imported name (for ``import a.b.c``: ``c``)
    path: str  # the importing file, relative to the package's parent
    line: int
    function: str | None  # qualified name of the enclosing function, if any

    def where(self) -> str:
        inside = f", in {self.function}()" if self.function else ""
        return f"{self.path}:{self.line}{inside}"


def find_modules(package_dir: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` file of the package."""
    package_dir = Path(package_dir)
    modules = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = path.relative_to(package_dir.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _is_package(module: str, modules: dict[str, Path]) -> bool:
    return modules[module].name == "__init__.py"


def _known_prefix(name: str, modules: dict[str, Path]) -> str | None:
    """The longest prefix of ``name`` that is a module of the package."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        prefix = ".".join(parts[:end])
        if prefix in modules:
            return prefix
    return None


class _Collector(ast.NodeVisitor):
    def __init__(self, module, modules, root):
        self.module = module
        self.modules = modules
        self.root = root  # the package's top-level name
        self.path = str(modules[module].relative_to(modules[root].parent.parent))
        self.scope: list[str] = []  # enclosing classes and functions
        self.depth = 0  # enclosing functions
        self.imports: list[Import] = []

    # scopes
    def _scoped(self, node, is_function):
        self.scope.append(node.name)
        self.depth += is_function
        self.generic_visit(node)
        self.depth -= is_function
        self.scope.pop()

    def visit_ClassDef(self, node):
        self._scoped(node, False)

    def visit_FunctionDef(self, node):
        self._scoped(node, True)

    visit_AsyncFunctionDef = visit_FunctionDef

    # imports
    def _add(self, target, name, node):
        target = _known_prefix(target, self.modules)
        if target is None:
            return
        function = ".".join(self.scope) if self.depth else None
        self.imports.append(
            Import(self.module, target, name, self.path, node.lineno, function)
        )

    def _ours(self, name):
        return name == self.root or name.startswith(self.root + ".")

    def visit_Import(self, node):
        for alias in node.names:
            if self._ours(alias.name):
                self._add(alias.name, alias.name.rsplit(".", 1)[-1], node)

    def visit_ImportFrom(self, node):
        if node.level:
            base = self.module.split(".")
            if not _is_package(self.module, self.modules):
                base = base[:-1]
            if node.level - 1 >= len(base):
                raise ValueError(f"{self.path}:{node.lineno}: beyond the top package")
            base = base[: len(base) - (node.level - 1)]
            target = ".".join(base + ([node.module] if node.module else []))
        else:
            target = node.module
        if not self._ours(target):
            return
        for alias in node.names:
            submodule = f"{target}.{alias.name}"
            if submodule in self.modules:  # ``from pkg import submodule``
                self._add(submodule, alias.name, node)
            else:
                self._add(target, alias.name, node)

    def visit_Call(self, node):
        # importlib.import_module("skstego.x") with a constant name
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else None
        name = func.id if isinstance(func, ast.Name) else name
        if (
            name in ("import_module", "__import__")
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
            and self._ours(node.args[0].value)
        ):
            target = node.args[0].value
            self._add(target, target.rsplit(".", 1)[-1], node)
        self.generic_visit(node)


def collect_imports(package_dir: Path) -> tuple[dict[str, Path], list[Import]]:
    """The package's modules, and every import of one of them by another."""
    modules = find_modules(package_dir)
    root = Path(package_dir).name
    imports = []
    for module, path in modules.items():
        collector = _Collector(module, modules, root)
        collector.visit(ast.parse(path.read_text(encoding="utf-8"), str(path)))
        imports.extend(collector.imports)
    return modules, imports


def _strongly_connected(nodes, edges):
    """Tarjan's algorithm, iterative; components of more than one module."""
    index, low, on_stack, stack, components = {}, {}, set(), [], []
    counter = 0
    for start in nodes:
        if start in index:
            continue
        work = [(start, iter(sorted(edges[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, successors = work[-1]
            for nxt in successors:
                if nxt not in index:
                    index[nxt] = low[nxt] = counter
                    counter += 1
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(edges[nxt]))))
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            else:
                work.pop()
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1 or node in edges[node]:
                        components.append(sorted(component))
    return components


def _shortest_cycle(start, edges, within):
    """The shortest chain start -> ... -> start inside one component."""
    parent = {}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for nxt in sorted(edges[node]):
            if nxt not in within:
                continue
            if nxt == start:
                chain = [node]
                while chain[-1] != start:
                    chain.append(parent[chain[-1]])
                return [start, *reversed(chain[:-1]), start]
            if nxt not in parent:
                parent[nxt] = node
                queue.append(nxt)
    raise AssertionError("not a cycle")  # pragma: no cover


def find_cycles(imports: list[Import]) -> list[str]:
    """One entry per import cycle (a strongly connected set of modules).

    An entry lists the shortest chains ``a -> b (file:line) -> a (file:line)``
    through its modules, enough of them for every module of a tangle to show.
    """
    edges = defaultdict(set)
    first = {}  # (source, target) -> the first statement making the edge
    for imp in imports:
        edges[imp.source].add(imp.target)
        first.setdefault((imp.source, imp.target), imp)
    nodes = sorted({imp.source for imp in imports} | {imp.target for imp in imports})
    reports = []
    for component in _strongly_connected(nodes, edges):
        chains, covered = [], set()
        for start in component:
            if start in covered:
                continue
            chain = _shortest_cycle(start, edges, set(component))
            covered.update(chain)
            chains.append(
                chain[0]
                + "".join(
                    f" -> {b} ({first[a, b].where()})"
                    for a, b in itertools.pairwise(chain)
                )
            )
        reports.append("\n    ".join(chains))
    return reports


def layer_of(module: str, layers=LAYERS) -> int | None:
    """Index of the module's layer (0 = top), or None when it has none."""
    for i, (_, patterns) in enumerate(layers):
        if module in patterns:
            return i
    matches = [
        i
        for i, (_, patterns) in enumerate(layers)
        if any("*" in p and fnmatch.fnmatchcase(module, p) for p in patterns)
    ]
    return max(matches) if matches else None


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def unlayered_modules(modules, layers=LAYERS) -> list[str]:
    return sorted(m for m in modules if layer_of(m, layers) is None)


def upward_imports(imports: list[Import], layers=LAYERS) -> list[Import]:
    """Imports of a module in a strictly higher layer than the importer."""
    out = []
    for imp in imports:
        src, dst = layer_of(imp.source, layers), layer_of(imp.target, layers)
        if src is not None and dst is not None and dst < src:
            out.append(imp)
    return out


def private_upward_imports(imports: list[Import], layers=LAYERS) -> list[Import]:
    """Rule (b): private names imported from a higher layer."""
    return [imp for imp in upward_imports(imports, layers) if _private(imp.name)]


def function_imports(imports: list[Import], allowed=ALLOWED_FUNCTION_IMPORTS):
    """Rule (c): skstego imports inside functions, less the allow-list."""
    return [
        imp
        for imp in imports
        if imp.function is not None and (imp.source, imp.target) not in allowed
    ]


def stale_allowances(imports: list[Import], allowed=ALLOWED_FUNCTION_IMPORTS):
    """Allow-list entries that no import inside a function needs (or that
    give no reason)."""
    used = {(imp.source, imp.target) for imp in imports if imp.function is not None}
    return sorted(
        pair for pair, reason in allowed.items() if pair not in used or not reason
    )


def _grouped(imports: list[Import]) -> str:
    by_module = defaultdict(list)
    for imp in imports:
        by_module[imp.source].append(imp)
    lines = []
    for module in sorted(by_module):
        lines.append(f"{module} ({len(by_module[module])}):")
        lines.extend(
            f"    {imp.name} from {imp.target} ({imp.where()})"
            for imp in by_module[module]
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------
# the rules, on skstego
# --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def package():
    return collect_imports(PACKAGE_DIR)


def test_every_module_has_a_layer(package):
    modules, _ = package
    assert len(modules) > 20  # the package was found
    missing = unlayered_modules(modules)
    assert not missing, f"modules missing from LAYERS: {missing}"


def test_no_import_cycles(package):
    _, imports = package
    cycles = find_cycles(imports)
    assert not cycles, f"{len(cycles)} import cycle(s):\n" + "\n".join(cycles)


def test_no_private_name_imported_from_a_higher_layer(package):
    _, imports = package
    bad = private_upward_imports(imports)
    assert not bad, (
        f"{len(bad)} private name(s) imported from a higher layer:\n" + _grouped(bad)
    )


def test_no_skstego_import_inside_functions(package):
    _, imports = package
    bad = function_imports(imports)
    assert not bad, f"{len(bad)} skstego import(s) inside functions:\n" + _grouped(bad)
    # and no stale allow-list entry, which would let a future import through
    stale = stale_allowances(imports)
    assert not stale, f"allow-list entries without a matching import: {stale}"


# --------------------------------------------------------------------------
# the checker itself, on small packages written here
# --------------------------------------------------------------------------
SYNTHETIC_LAYERS = (
    ("top", ("pkg.app",)),
    ("middle", ("pkg.sub", "pkg.sub.*")),
    ("bottom", ("pkg", "pkg._util", "pkg.sub._kernel")),
)


def _write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / "pkg"


CLEAN = {
    "pkg/__init__.py": '"""A package."""\n',
    "pkg/_util.py": "import numpy as np\n\n\ndef _helper():\n    return np.pi\n",
    "pkg/sub/__init__.py": "from ._est import Estimator\n",
    "pkg/sub/_kernel.py": "from .._util import _helper\n",
    "pkg/sub/_est.py": (
        "from . import _kernel\n"
        "from ._kernel import _helper\n"
        "from pkg._util import _helper as h\n"
        "\n\nclass Estimator:\n"
        "    def fit(self):\n"
        "        import scipy  # an optional third-party import: allowed\n"
        "        return scipy\n"
    ),
    "pkg/app.py": "import pkg.sub\nfrom .sub import _est, Estimator\n",
}


def test_checker_passes_a_clean_package(tmp_path):
    modules, imports = collect_imports(_write(tmp_path, CLEAN))
    assert set(modules) == {
        "pkg",
        "pkg._util",
        "pkg.app",
        "pkg.sub",
        "pkg.sub._est",
        "pkg.sub._kernel",
    }
    assert unlayered_modules(modules, SYNTHETIC_LAYERS) == []
    assert find_cycles(imports) == []
    assert private_upward_imports(imports, SYNTHETIC_LAYERS) == []
    assert function_imports(imports, {}) == []
    # every relative and absolute form was resolved, submodules included
    edges = {(i.source, i.target, i.name) for i in imports}
    assert edges == {
        ("pkg.sub", "pkg.sub._est", "Estimator"),
        ("pkg.sub._kernel", "pkg._util", "_helper"),
        ("pkg.sub._est", "pkg.sub._kernel", "_kernel"),
        ("pkg.sub._est", "pkg.sub._kernel", "_helper"),
        ("pkg.sub._est", "pkg._util", "_helper"),
        ("pkg.app", "pkg.sub", "sub"),
        ("pkg.app", "pkg.sub._est", "_est"),
        ("pkg.app", "pkg.sub", "Estimator"),
    }


def test_checker_finds_cycles_with_their_chain(tmp_path):
    files = dict(CLEAN)
    # a module-level cycle through a package __init__ ...
    files["pkg/_util.py"] = "from .sub import Estimator\n"
    # ... and, apart from it, one made by an import inside a function
    files["pkg/sub/a.py"] = "def f():\n    from .. import app\n    return app\n"
    files["pkg/app.py"] = "from .sub.a import f\n"
    _, imports = collect_imports(_write(tmp_path, files))
    cycles = find_cycles(imports)
    assert cycles == [
        "pkg._util -> pkg.sub (pkg/_util.py:1)"
        " -> pkg.sub._est (pkg/sub/__init__.py:1)"
        " -> pkg._util (pkg/sub/_est.py:3)\n"
        # _kernel, which _est imports, imports _util too: in the same tangle
        "    pkg.sub._kernel -> pkg._util (pkg/sub/_kernel.py:1)"
        " -> pkg.sub (pkg/_util.py:1) -> pkg.sub._est (pkg/sub/__init__.py:1)"
        " -> pkg.sub._kernel (pkg/sub/_est.py:1)",
        "pkg.app -> pkg.sub.a (pkg/app.py:1) -> pkg.app (pkg/sub/a.py:2, in f())",
    ]
    assert function_imports(imports, {}) == [
        Import("pkg.sub.a", "pkg.app", "app", "pkg/sub/a.py", 2, "f")
    ]
    # the allow-list lets a listed pair through, and only that pair
    allowed = {("pkg.sub.a", "pkg.app"): "a test"}
    assert function_imports(imports, allowed) == []
    assert stale_allowances(imports, allowed) == []
    # an entry for an import that is not (or no longer) inside a function
    stale = {**allowed, ("pkg.app", "pkg.sub.a"): "module level", ("pkg", "x"): "?"}
    assert stale_allowances(imports, stale) == [("pkg", "x"), ("pkg.app", "pkg.sub.a")]
    assert stale_allowances(imports, {("pkg.sub.a", "pkg.app"): ""}) != []
    assert function_imports(imports, {("pkg.sub.a", "pkg.sub"): "other"}) != []


def test_checker_shows_every_module_of_a_tangle(tmp_path):
    files = dict(CLEAN)
    # a <-> b and b <-> c: one tangle, two shortest chains
    files["pkg/a.py"] = "from . import b\n"
    files["pkg/b.py"] = "from . import a, c\n"
    files["pkg/c.py"] = "from .b import x\n"
    _, imports = collect_imports(_write(tmp_path, files))
    assert find_cycles(imports) == [
        "pkg.a -> pkg.b (pkg/a.py:1) -> pkg.a (pkg/b.py:1)\n"
        "    pkg.c -> pkg.b (pkg/c.py:1) -> pkg.c (pkg/b.py:1)"
    ]


def test_checker_finds_a_self_import(tmp_path):
    files = dict(CLEAN)
    files["pkg/_util.py"] = "from . import _util\n"
    _, imports = collect_imports(_write(tmp_path, files))
    assert find_cycles(imports) == ["pkg._util -> pkg._util (pkg/_util.py:1)"]


def test_checker_finds_private_imports_from_above(tmp_path):
    files = dict(CLEAN)
    files["pkg/sub/_kernel.py"] = (
        "from .._util import _helper\n"  # from below: fine
        "from ._est import Estimator\n"  # public, from above: not rule (b)
        "import pkg.sub._est\n"  # a private module, from above
        "\n\ndef g():\n"
        "    from ._est import _private_helper, __doc__\n"  # private; dunder
        "    from pkg.app import _run\n"
    )
    _, imports = collect_imports(_write(tmp_path, files))
    bad = private_upward_imports(imports, SYNTHETIC_LAYERS)
    assert [(i.target, i.name, i.line, i.function) for i in bad] == [
        ("pkg.sub._est", "_est", 3, None),
        ("pkg.sub._est", "_private_helper", 7, "g"),
        ("pkg.app", "_run", 8, "g"),
    ]
    # the public one is upward too, which the report shows
    assert len(upward_imports(imports, SYNTHETIC_LAYERS)) == 5
    # the same names within one layer are allowed
    flat = (("all", ("pkg", "pkg.*")),)
    assert private_upward_imports(imports, flat) == []


def test_checker_reads_dynamic_imports_and_finds_unlayered_modules(tmp_path):
    files = dict(CLEAN)
    files["pkg/extra.py"] = (
        "import importlib\n\n\ndef h():\n"
        "    return importlib.import_module('pkg.sub._est')\n"
    )
    modules, imports = collect_imports(_write(tmp_path, files))
    assert unlayered_modules(modules, SYNTHETIC_LAYERS) == ["pkg.extra"]
    assert [
        (i.source, i.target, i.function) for i in function_imports(imports, {})
    ] == [("pkg.extra", "pkg.sub._est", "h")]


def test_layer_patterns():
    assert layer_of("skstego.probes._kmeans") == 1
    assert layer_of("skstego.probes._kmeans_kernels") == 2  # named in full
    assert layer_of("skstego.projection._pca_kernels") == 2  # the lowest wildcard
    assert layer_of("skstego.probes") == 1
    assert layer_of("skstego") == 0
    assert layer_of("skstego._device") == 5
    assert layer_of("skstego.unknown") is None


# --------------------------------------------------------------------------
# the report
# --------------------------------------------------------------------------
def report(package_dir: Path = PACKAGE_DIR) -> str:
    modules, imports = collect_imports(package_dir)
    cycles = find_cycles(imports)
    private = private_upward_imports(imports)
    inner = function_imports(imports)
    public = [i for i in upward_imports(imports) if not _private(i.name)]
    sections = [
        f"{len(modules)} modules, {len(imports)} imported names",
        f"modules without a layer: {unlayered_modules(modules) or 'none'}",
        f"(a) import cycles: {len(cycles)}",
        *(f"    {c}" for c in cycles),
        f"(b) private names from a higher layer: {len(private)}",
        _grouped(private),
        f"(c) skstego imports inside functions: {len(inner)}",
        _grouped(inner),
        f"public names from a higher layer (allowed): {len(public)}",
        _grouped(public),
    ]
    return "\n".join(s for s in sections if s)


if __name__ == "__main__":
    print(report(Path(sys.argv[1]) if len(sys.argv) > 1 else PACKAGE_DIR))
