"""The import rules of a package, read from its source with ast (nothing is imported):

  a) no import cycle among its modules. Every import statement is an edge, at module level or inside a function:
     a function-local import only postpones the cycle to the first call. `from pkg import name` is an edge to the
     submodule pkg.name when there is one, else to pkg (its __init__); the package __init__s Python runs on the
     way to a module are not edges of their own.
  b) no private name (one leading underscore; dunders are fine) of one module used by another, imported
     (`from pkg.mod import _name`) or as an attribute of an imported module (`mod._name`).
  c) no function-local import except of an optional or heavy dependency in LOCAL_IMPORT_ALLOWED (or in a module
     of LOCAL_IMPORT_MODULES, for the reason given there).
  d) no change of the import path (sys.path.insert / append / extend, an assignment to sys.path, site.addsitedir):
     a module is imported by its package name, never found by patching where Python looks.
  e) no module of the package imported by a bare name (`import sweep_plan` next to sweep_plan.py): that works
     only with the module's own folder on sys.path; import it relatively or by its full name.

check_package(path, uses=...) returns a Report; report.message() lists every violation, one per line. `uses`
names other packages the checked one imports (tools/ uses megabranch/): their modules are known, so a private
name of theirs counts as another module's, but their files are not checked.
"""

from __future__ import annotations

import ast
import os
import sys
from collections import deque
from dataclasses import dataclass, field

# What may be imported inside a function (a prefix: the module or any submodule), and why not at module level.
LOCAL_IMPORT_ALLOWED = {
    "deepspeed": "optional (requirements-dev.txt); importing it picks an accelerator, about 0.25 s",
    "apex": "optional and not on PyPI; probed at run time",
    "matplotlib": "only for plots; about 0.3 s to import",
    "sacrebleu": "only where BLEU is scored; about 0.15 s to import (its table printer), every training process",
    "torch.utils.tensorboard": "only with log.tensorboard on; about 0.2 s to import",
    "torch.utils.cpp_extension": "only to JIT-build a kernel; it imports setuptools",
    "torchscale": "optional (test extras); only to check a conversion against the real model",
    "fairseq": "optional (test extras); only to read and check a fairseq checkpoint; about 3.5 s to import",
    "torch.distributed.pipelining": "torch's own B/W split (a private module some torch versions lack): only what "
    "tools.bench.backward_split times against ours",
    "omegaconf": "fairseq's config library; only with fairseq",
    "ctranslate2": "optional (requirements-peers.txt); only to export to and check against CTranslate2",
    "transformers": "optional (requirements-peers.txt); only to export to and check against MarianMT; about 2 s",
}
# Modules whose every function may import anything locally, and why.
LOCAL_IMPORT_MODULES = {
    "tools.gpu_check": "its parts run in child processes, each under a time budget; the driver imports neither "
    "torch nor megabranch, so a broken or hanging import is one part's failure, not the report's",
}
PATH_CHANGES = {"sys.path.insert", "sys.path.append", "sys.path.extend", "site.addsitedir"}


def _allowed_local(name: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in LOCAL_IMPORT_ALLOWED)


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


@dataclass(frozen=True)
class Site:
    """Where an import statement stands, and the function it is in ("" at module level)."""

    path: str
    line: int
    function: str = ""

    def __str__(self) -> str:
        where = f"{self.path}:{self.line}"
        return f"{where} (in {self.function})" if self.function else where


@dataclass
class Report:
    cycles: list[list[str]] = field(default_factory=list)  # each [a, b, ..., a]
    edges: dict[tuple[str, str], list[Site]] = field(default_factory=dict)  # every import edge, with its sites
    private: list[str] = field(default_factory=list)
    local: list[str] = field(default_factory=list)
    path_changes: list[str] = field(default_factory=list)
    bare: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.cycles or self.private or self.local or self.path_changes or self.bare)

    def message(self, title: str = "import rules broken") -> str:
        out = [
            f"{title}: {len(self.cycles)} import cycle(s), {len(self.private)} private name(s) used across "
            f"modules, {len(self.local)} function-local import(s) outside the allowlist, "
            f"{len(self.path_changes)} change(s) of sys.path, {len(self.bare)} module(s) imported by a bare name"
        ]
        if self.cycles:
            out.append("import cycles (the shortest through each of their edges):")
            out += ["  " + " -> ".join(c) for c in self.cycles]
            out.append("  made by the imports at:")
            in_cycles = sorted({(a, b) for c in self.cycles for a, b in zip(c, c[1:])})
            out += [f"    {a} -> {b}: " + ", ".join(map(str, self.edges[a, b])) for a, b in in_cycles]
        if self.private:
            out.append("private names used across modules:")
            out += ["  " + p for p in self.private]
        if self.local:
            out.append("function-local imports (allowed only of " + ", ".join(LOCAL_IMPORT_ALLOWED) + "):")
            out += ["  " + x for x in self.local]
        if self.path_changes:
            out.append("changes of the import path (import by the package name instead):")
            out += ["  " + x for x in self.path_changes]
        if self.bare:
            out.append("modules of the package imported by a bare name (import them relatively):")
            out += ["  " + x for x in self.bare]
        return "\n".join(out)


def check_package(root: str, uses: tuple[str, ...] = ()) -> Report:
    """Apply the rules to the package whose directory is `root` (its name is the directory's name); `uses`: the
    directories of other packages it imports, known but not checked."""
    modules = _modules(root)
    known = dict(modules)
    for other in uses:
        known.update(_modules(other))
    top = os.path.dirname(os.path.abspath(root))
    report = Report()
    for module, path in modules.items():
        rel = os.path.relpath(path, top)
        with open(path, encoding="utf-8") as fh:
            tree = ast.parse(fh.read(), filename=rel)
        walker = _Walker()
        walker.visit(tree)
        is_package = path.endswith("__init__.py")
        _check_imports(module, is_package, rel, walker.imports, known, report)
        _check_attributes(module, is_package, rel, walker, known, report)
        report.path_changes += [f"{rel}:{node.lineno}: {ast.unparse(node)}" for node in walker.path_changes]
    for found in (report.private, report.local, report.path_changes, report.bare):
        found.sort()
    report.cycles = _cycles(set(report.edges))
    return report


def _modules(root: str) -> dict[str, str]:
    """Dotted module name -> file, for every .py file under the package directory `root`."""
    top = os.path.dirname(os.path.abspath(root))
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
        for f in sorted(filenames):
            if f.endswith(".py"):
                parts = os.path.relpath(os.path.join(dirpath, f), top)[:-3].split(os.sep)
                if parts[-1] == "__init__":
                    parts.pop()
                found[".".join(parts)] = os.path.join(dirpath, f)
    return found


class _Walker(ast.NodeVisitor):
    """Import statements with the function they stand in ("" at module level or in a class body), every
    attribute expression, and every change of sys.path."""

    def __init__(self):
        self.scope: list[tuple[str, bool]] = []  # (name, is a function), from the module down
        self.imports: list[tuple[ast.Import | ast.ImportFrom, str]] = []
        self.attributes: list[ast.Attribute] = []
        self.path_changes: list[ast.AST] = []

    def _enter(self, node, is_function: bool):
        self.scope.append((node.name, is_function))
        self.generic_visit(node)
        self.scope.pop()

    def visit_FunctionDef(self, node):
        self._enter(node, True)

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_ClassDef(self, node):
        self._enter(node, False)

    def _import(self, node):
        local = any(is_function for _, is_function in self.scope)
        self.imports.append((node, ".".join(name for name, _ in self.scope) if local else ""))

    visit_Import = visit_ImportFrom = _import

    def visit_Attribute(self, node):
        self.attributes.append(node)
        self.generic_visit(node)

    def visit_Call(self, node):
        if isinstance(node.func, ast.Attribute) and ".".join(_chain(node.func) or []) in PATH_CHANGES:
            self.path_changes.append(node)
        self.generic_visit(node)

    def _assign(self, node):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        for t in targets:
            t = t.value if isinstance(t, ast.Subscript) else t  # sys.path[:0] = [...]
            if isinstance(t, ast.Attribute) and _chain(t) == ["sys", "path"]:
                self.path_changes.append(node)
        self.generic_visit(node)

    visit_Assign = visit_AugAssign = _assign


def _from_base(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module a `from ... import` reads from."""
    if node.level == 0:
        return node.module or ""
    parts = (module if is_package else module.rpartition(".")[0]).split(".")
    if node.level - 1 >= len(parts):
        raise ValueError(f"{module}: relative import beyond the top package")
    base = parts[: len(parts) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _check_imports(module, is_package, rel, imports, modules, report) -> None:
    """One module's edges (rule a), private names imported (rule b), function-local imports (rule c) and modules
    of its own package imported by a bare name (rule e). `modules`: every module known, by dotted name."""
    own = module if is_package else module.rpartition(".")[0]  # the package its bare names would resolve in

    def edge(target: str, site: Site) -> None:
        sites = report.edges.setdefault((module, target), []) if target != module else [site]
        if site not in sites:
            sites.append(site)

    for node, function in imports:
        site = Site(rel, node.lineno, function)
        absolute = (
            [a.name for a in node.names]
            if isinstance(node, ast.Import)
            else [node.module or ""]
            if node.level == 0
            else []
        )
        for name in absolute:  # a stdlib name is the stdlib's, whatever lies beside the module
            first = name.split(".")[0]
            if own and f"{own}.{first}" in modules and first not in sys.stdlib_module_names:
                report.bare.append(f"{site}: {ast.unparse(node)} (the module {own}.{first})")
        if isinstance(node, ast.Import):
            loads = [a.name for a in node.names]
            for name in loads:
                if name in modules:
                    edge(name, site)
        else:
            base = _from_base(module, is_package, node)
            for a in node.names:
                sub = f"{base}.{a.name}"
                if sub in modules:  # from pkg import submodule
                    edge(sub, site)
                    if _private(a.name) and not module.startswith(base + "."):
                        report.private.append(f"{site}: {ast.unparse(node)} (private submodule {sub})")
                elif base in modules:
                    edge(base, site)
                    if _private(a.name):
                        report.private.append(f"{site}: {ast.unparse(node)} ({base}.{a.name})")
            # `from torch.utils import cpp_extension` loads the allowed torch.utils.cpp_extension
            loads = [base] if _allowed_local(base) else [f"{base}.{a.name}" for a in node.names]
        if function and module not in LOCAL_IMPORT_MODULES and not all(_allowed_local(name) for name in loads):
            report.local.append(f"{rel}:{node.lineno} in {function}: {ast.unparse(node)}")


def _check_attributes(module, is_package, rel, walker, modules, report) -> None:
    """mod._name, where mod is a package module bound by an import anywhere in this file (rule b)."""
    bound: dict[str, str] = {}  # local name -> the package module it names
    for node, _ in walker.imports:
        for a in node.names:
            if isinstance(node, ast.Import):
                name = a.name if a.asname else a.name.split(".")[0]  # `import p.m` binds p
                if name in modules:
                    bound[a.asname or name] = name
            else:
                sub = f"{_from_base(module, is_package, node)}.{a.name}"
                if sub in modules:
                    bound[a.asname or a.name] = sub
    for attr in walker.attributes:
        names = _chain(attr)
        if not names or names[0] not in bound:
            continue
        dotted = [bound[names[0]], *names[1:]]
        owner, name = ".".join(dotted[:-1]), dotted[-1]
        if owner in modules and owner != module and ".".join(dotted) not in modules and _private(name):
            report.private.append(f"{rel}:{attr.lineno}: {ast.unparse(attr)} ({owner}.{name})")


def _chain(node: ast.Attribute) -> list[str] | None:
    """`a.b.c` as ["a", "b", "c"]; None when the chain does not start at a plain name."""
    names = []
    while isinstance(node, ast.Attribute):
        names.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return [node.id, *reversed(names)]


def folder_cycles(report: Report) -> list[list[str]]:
    """Cycles between the package's folders (its subpackages, and the top-level modules each as its own): an
    import of parallel/ from training/ and one of training/ from parallel/ make one even when no two modules import
    each other."""

    def folder(module: str) -> str:
        return ".".join(module.split(".")[:2])

    return _cycles({(folder(a), folder(b)) for a, b in report.edges if folder(a) != folder(b)})


def _cycles(edges: set[tuple[str, str]]) -> list[list[str]]:
    """For every edge inside a strongly connected component, the shortest cycle through it; deduplicated,
    each rotated to start at its smallest module, shortest first."""
    graph: dict[str, set[str]] = {}
    for a, b in edges:
        graph.setdefault(a, set()).add(b)
        graph.setdefault(b, set())
    component = _components(graph)
    found = set()
    for a, b in sorted(edges):
        if component[a] != component[b]:
            continue
        prev, queue = {b: None}, deque([b])  # breadth-first from b back to a, inside the component
        while queue and a not in prev:
            n = queue.popleft()
            for m in sorted(graph[n]):
                if m not in prev and component[m] == component[a]:
                    prev[m] = n
                    queue.append(m)
        back, n = [], a
        while n is not None:
            back.append(n)
            n = prev[n]
        ring = [a, *reversed(back)][:-1]  # a, b, ..., (back to a)
        i = ring.index(min(ring))
        found.add(tuple(ring[i:] + ring[:i] + [ring[i]]))
    return [list(c) for c in sorted(found, key=lambda c: (len(c), c))]


def _components(graph: dict[str, set[str]]) -> dict[str, int]:
    """Tarjan's strongly connected components: node -> component id."""
    index, low, stack, on_stack, comp = {}, {}, [], set(), {}

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp[w] = index[v]
                if w == v:
                    break

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return comp
