"""The shape of ``sampling/``: no import cycle (imports inside functions included), the algorithm
core never imports the application layer (``sampling.app``) nor the package's facade, and
``training/`` never imports ``benchmark/``."""
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def modules(package: str) -> dict[str, str]:
    """Dotted module name -> file, for every .py file under ``package`` (a folder of ROOT)."""
    out = {}
    for folder, _, files in os.walk(os.path.join(ROOT, package)):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(folder, f), ROOT)[:-3].split(os.sep)
                out[".".join(rel[:-1] if rel[-1] == "__init__" else rel)] = os.path.join(folder, f)
    return out


def imports(name: str, path: str, known: dict[str, str]) -> set[str]:
    """The modules of ``known`` that the file imports anywhere in it (module level or inside a
    function): ``from a.b import c`` counts as a.b.c when that is a module, else as a.b."""
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(open(path).read(), path)):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[:len(parts) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            for a in node.names:
                out.add(f"{base}.{a.name}" if f"{base}.{a.name}" in known else base)
    return {m for m in out if m in known}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module, or of one that imports itself (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in graph[v]:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def graph_of(package: str) -> dict[str, set[str]]:
    known = modules(package)
    return {name: imports(name, path, known) for name, path in known.items()}


def test_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"a"}}) == [["a"]] and cycles({"a": {"b"}, "b": set()}) == []


def test_sampling_has_no_import_cycle():
    found = cycles(graph_of("sampling"))
    assert not found, "import cycles in sampling/: " + "; ".join(" <-> ".join(c) for c in found)


def test_the_core_does_not_import_the_application_or_the_facade():
    """``sampling/__init__.py`` is what users import; ``sampling.app`` (flags, model loading, prompt
    batching, the server's scheduler) builds on the core, never the other way round."""
    core = {m: deps for m, deps in graph_of("sampling").items() if m != "sampling"}     # the facade may import all
    bad = [f"{m} imports {i}" for m, deps in core.items() for i in deps
           if i == "sampling" or (i.startswith("sampling.app") and not m.startswith("sampling.app"))]
    assert not bad, bad


def test_training_does_not_import_benchmark():
    known = modules("training") | modules("benchmark")
    bad = [f"{m} imports {i}" for m, path in modules("training").items() for i in imports(m, path, known)
           if i.startswith("benchmark")]
    assert not bad, bad
