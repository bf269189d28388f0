"""The import graph of ``src/ucmkd`` has no cycle, lazy (function-level) imports included:
each layer imports only the layers below it."""
import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src" / "ucmkd"


def import_graph(root: Path = SRC) -> dict:
    """module -> the ucmkd modules it imports anywhere in its file (``from pkg import sub`` counts
    as an import of ``pkg.sub`` only)."""
    mods = {}
    for p in root.rglob("*.py"):
        parts = p.relative_to(root.parent).with_suffix("").parts
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    graph = {m: set() for m in mods}
    for m, p in mods.items():
        pkg = m.split(".") if p.name == "__init__.py" else m.split(".")[:-1]
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = ".".join(pkg[:len(pkg) - node.level + 1] + ([node.module] if node.module else [])) \
                    if node.level else node.module
                subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in mods]
                targets = subs if len(subs) == len(node.names) else [base] + subs
            else:
                continue
            for t in targets:
                while t and t not in mods:
                    t = t.rpartition(".")[0]
                if t and t != m:
                    graph[m].add(t)
    return graph


def find_cycle(graph: dict):
    """One import cycle as a list of modules, or None (depth-first search)."""
    state, stack = {}, []

    def visit(v):
        state[v] = 1
        stack.append(v)
        for w in sorted(graph[v]):
            if state.get(w) == 1:
                return stack[stack.index(w):] + [w]
            if w not in state and (c := visit(w)):
                return c
        stack.pop()
        state[v] = 2
        return None

    for v in sorted(graph):
        if v not in state and (c := visit(v)):
            return c
    return None


def test_the_checker_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_among_ucmkd_modules():
    graph = import_graph()
    assert len(graph) > 50 and graph["ucmkd.api"]
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def _calls(name: str) -> list:
    """(module, line) of every call of ``name(...)`` in src/ucmkd."""
    out = []
    for p in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) == name:
                out.append((p.relative_to(SRC.parent).as_posix(), node.lineno))
    return out


def test_a_run_is_assembled_in_one_place():
    """Every Trainer and PairingSampler (teacher training and the diagnose probe included) is
    built by ucmkd.assembly; every model from a ModelConfig by models.build_model."""
    for name in ("Trainer", "PairingSampler"):
        sites = _calls(name)
        assert [m for m, _ in sites] == ["ucmkd/assembly.py"], f"{name}( built in {sites}"
    assert {m for m, _ in _calls("build_classifier")} <= {"ucmkd/models/backbones.py", "ucmkd/export.py",
                                                         "ucmkd/models/adapters.py"}


LOWER = ("ucmkd.config", "ucmkd.collectives", "ucmkd.data", "ucmkd.models", "ucmkd.losses", "ucmkd.methods",
         "ucmkd.augment", "ucmkd.cache", "ucmkd.registry", "ucmkd.errors")
UPPER = ("ucmkd.engine", "ucmkd.plugins", "ucmkd.assembly", "ucmkd.keys", "ucmkd.checks", "ucmkd.api", "ucmkd.grid",
         "ucmkd.bench", "ucmkd.experiment", "ucmkd.cli", "ucmkd.export", "ucmkd.diagnose", "ucmkd.feature_plot")


def _under(module: str, prefixes) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def test_methods_losses_data_and_models_never_import_the_engine_or_above():
    """Layers: config, collectives, data, models, losses, methods below the engine (trainer,
    strategies, the shadow, the teacher cache), below the one assembly and the API."""
    graph = import_graph()
    upward = sorted((m, t) for m, ts in graph.items() if _under(m, LOWER) for t in ts if _under(t, UPPER))
    assert not upward, f"imports from a lower layer into a higher one: {upward}"
