"""The layout rules of the charter, read from the source: no import circles between the repository's modules
(imports inside functions count: they only postpone the circle), and no script imports another script."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def local_modules():
    """{module name: path} of the top-level .py files and the data package."""
    mods = {p.stem: p for p in ROOT.glob("*.py")}
    mods.update({f"data.{p.stem}" if p.stem != "__init__" else "data": p for p in (ROOT / "data").glob("*.py")})
    return mods


def imports(path, mods):
    """The local modules a file imports, anywhere in it."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # `from data import gsm8k` imports the module data.gsm8k; `from model import load_model` the module model
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in mods else node.module
                     for a in node.names]
        else:
            continue
        out |= {n for n in names if n in mods}
    return out


def graph():
    mods = local_modules()
    return {name: imports(path, mods) - {name} for name, path in mods.items()}


def cycles(g):
    """Every import circle, as the list of modules along it (depth-first search, each circle reported once)."""
    found, state = [], {}

    def visit(node, stack):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(g.get(node, ())):
            if state.get(nxt) == "open":
                found.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = "done"

    for node in sorted(g):
        if node not in state:
            visit(node, [])
    return found


def test_the_cycle_finder_finds_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circles():
    g = graph()
    assert {"loading", "training", "errors", "memgen", "data", "data.gsm8k"} <= set(g)  # the scan sees the repo
    assert "training" in g["errors"] and "loading" in g["training"]
    assert cycles(g) == [], " ; ".join(" -> ".join(c) for c in cycles(g))


def test_no_script_imports_another_script():
    g = graph()
    scripts = {n for n, p in local_modules().items() if 'if __name__ == "__main__":' in p.read_text()}
    assert {"eval", "train_weaver", "train_trigger", "show", "ablate"} <= scripts
    bad = {n: sorted(g[n] & scripts) for n in g if g[n] & scripts}
    assert bad == {}
