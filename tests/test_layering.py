"""The package's imports point down: no cycles, and the rules of the design hold (read from the
source with ``ast``, so a deferred import inside a function counts too)."""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "jaxcnn"


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """{module: the jaxcnn modules it imports anywhere in its source}."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets.add(node.module)
                targets |= {f"{node.module}.{a.name}" for a in node.names}
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


GRAPH = import_graph()


def _reaches(src: str, dst_prefix: str) -> list[str]:
    """A path of imports from ``src`` to a module under ``dst_prefix``, or []."""
    stack, seen = [(src, [src])], {src}
    while stack:
        node, path = stack.pop()
        for nxt in GRAPH[node]:
            if nxt == dst_prefix or nxt.startswith(dst_prefix + "."):
                return path + [nxt]
            if nxt not in seen:
                seen.add(nxt)
                stack.append((nxt, path + [nxt]))
    return []


def test_no_import_cycles():
    # package faces (__init__) import their own modules: a face is not part of a cycle of files
    faces = {n for n in GRAPH if (PACKAGE.parent / n.replace(".", "/") / "__init__.py").is_file()}
    files = {n: {t for t in ts if t not in faces} for n, ts in GRAPH.items() if n not in faces}
    state = {}

    def visit(n, path):
        state[n] = "open"
        for t in files.get(n, ()):
            if state.get(t) == "open":
                pytest.fail("import cycle: " + " -> ".join(path + [t]))
            if t not in state:
                visit(t, path + [t])
        state[n] = "done"

    for n in files:
        if n not in state:
            visit(n, [n])


def test_training_reaches_checkpoints_only_through_the_run_folder():
    direct = sorted(n for n in GRAPH if n.startswith("jaxcnn.train") and "jaxcnn.checkpoint" in GRAPH[n])
    assert not direct, direct


@pytest.mark.parametrize("src, forbidden", [
    ("jaxcnn.train", "jaxcnn.inference"),
    ("jaxcnn.train", "jaxcnn.experiments"),
    ("jaxcnn.freeze", "jaxcnn.models"),         # the layer order comes in as an argument
    ("jaxcnn.models", "jaxcnn.train"),
    ("jaxcnn.layers", "jaxcnn.models"),
    ("jaxcnn.data.core", "jaxcnn.data.offline"),  # containers do not know their loaders
    ("jaxcnn.data.core", "jaxcnn.data.tfds_data"),
    ("jaxcnn.checkpoint", "jaxcnn.train"),      # the Orbax store stores trees, nothing more
    ("jaxcnn.runfolder", "jaxcnn.train"),
    ("jaxcnn.runfolder", "jaxcnn.models"),
    ("jaxcnn.inference", "jaxcnn.experiments"),  # a run restores without the code that made it
    ("jaxcnn.inference", "jaxcnn.train"),
    ("jaxcnn.viz", "jaxcnn.experiments"),
    ("jaxcnn.explain", "jaxcnn.experiments"),   # Grad-CAM needs a model and its variables, nothing of training
    ("jaxcnn.explain", "jaxcnn.train"),
    ("jaxcnn.results", "jaxcnn.experiments"),   # test results come from the run folder, not the experiment
    ("jaxcnn.results", "jaxcnn.train"),
    ("jaxcnn.data", "jaxcnn.train"),            # a streaming loader may reuse jaxcnn.data.folder
    ("jaxcnn.data", "jaxcnn.inference"),
])
def test_imports_point_down(src, forbidden):
    sources = [n for n in GRAPH if n == src or n.startswith(src + ".")]
    assert sources, src
    for s in sources:
        path = _reaches(s, forbidden)
        assert not path, " -> ".join(path)


def test_no_module_level_caches_in_the_library():
    offenders = [f"{_module_name(p)}: {line.strip()}" for p in PACKAGE.rglob("*.py")
                 for line in p.read_text().splitlines() if "lru_cache" in line or "functools.cache" in line]
    assert not offenders, offenders
