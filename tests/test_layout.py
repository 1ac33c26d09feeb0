"""The layout a reader meets: the paper's modules at the top level, no import cycle between modules."""
import ast
import subprocess
import sys

from conftest import ROOT


def project_modules():
    """{dotted name: path} of every module outside tests/ and .venv/."""
    paths = [p for p in ROOT.rglob("*.py") if not {"tests", ".venv"} & set(p.relative_to(ROOT).parts)]
    return {".".join(p.relative_to(ROOT).with_suffix("").parts): p for p in paths}


def imports_of(path, modules):
    """The project modules a file imports, anywhere in it (top level or inside a function)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return found & set(modules)


def find_cycle(graph):
    state, path = {}, []

    def visit(node):
        state[node] = "open"
        path.append(node)
        for nxt in graph[node]:
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        path.pop()
        return None

    return next((c for n in graph if n not in state and (c := visit(n))), None)


def test_no_import_cycle_between_project_modules():
    modules = project_modules()
    graph = {name: sorted(imports_of(path, modules) - {name}) for name, path in modules.items()}
    assert find_cycle(graph) is None, find_cycle(graph)
    assert find_cycle({"a": ["b"], "b": ["c"], "c": ["a"]}) == ["a", "b", "c", "a"]  # the check itself works


def test_the_sampler_does_not_load_its_cli_and_the_top_level_is_the_paper():
    code = "import sys, sampler, train; print(sorted(m for m in sys.modules if m.split('.')[0] in ('demos', 'bench')))"
    loaded = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert loaded.stdout.strip() == "[]"
    top = {p.name for p in ROOT.glob("*.py")}
    assert {"unet.py", "vae.py", "lora.py", "regularizer.py", "sampler.py", "train.py"} <= top
    assert len(top) <= 12, sorted(top)
