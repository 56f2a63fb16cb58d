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
    """{module: the jaxcnn modules it imports anywhere in its source}. Importing ``a.b.c`` runs
    the package faces ``a.b`` (its ``__init__``) first: they count as imported too."""
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
        targets |= {t.rsplit(".", k)[0] for t in set(targets) for k in range(1, t.count(".") + 1)}
        graph[name] = {t for t in targets if t in modules and t != name and not name.startswith(t + ".")}
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
    ("jaxcnn.predict", "jaxcnn.experiments"),   # classifying an image loads no training code
    ("jaxcnn.predict", "jaxcnn.train"),
    ("jaxcnn.export", "jaxcnn.experiments"),    # exporting a run loads no training code
    ("jaxcnn.export", "jaxcnn.train"),
    ("jaxcnn.cli", "jaxcnn.experiments"),       # the commands' shared layer sits below every command
    ("jaxcnn.cli", "jaxcnn.train"),
])
def test_imports_point_down(src, forbidden):
    sources = [n for n in GRAPH if n == src or n.startswith(src + ".")]
    assert sources, src
    for s in sources:
        path = _reaches(s, forbidden)
        assert not path, " -> ".join(path)


#: The most layers the import graph may have, counted in rooms (see ``room_layers``).
MAX_LAYERS = 5
#: What no layer is counted for: the package face and the errors, which import nothing of jaxcnn.
FLOOR = ("jaxcnn", "jaxcnn.errors")


def test_the_floor_imports_nothing_of_jaxcnn():
    assert {m: GRAPH[m] for m in FLOOR if GRAPH[m]} == {}


def _room(module: str) -> str:
    """A top-level module (``jaxcnn.viz``) or a subpackage (``jaxcnn.train``) is one room."""
    return ".".join(module.split(".")[:2])


def room_layers() -> tuple[dict[str, int], dict[str, list[str]]]:
    """Each room's layer: 1 when it imports no other room, else one above the highest room it
    imports; and the longest chain of rooms down from each. (The package face ``jaxcnn``, a
    docstring and a version, is no room; nor is ``jaxcnn.errors``, the floor: the exception
    classes every layer raises, importing nothing of jaxcnn, so that ``jaxcnn.cli`` names them
    without loading what raises them.)"""
    rooms: dict[str, set[str]] = {}
    for module, targets in GRAPH.items():
        if module not in FLOOR:
            rooms.setdefault(_room(module), set()).update(_room(t) for t in targets if t not in FLOOR)
    for room, targets in rooms.items():
        targets.discard(room)
    chain: dict[str, list[str]] = {}

    def visit(room, path):
        if room in path:
            pytest.fail("rooms import each other: " + " -> ".join(path[path.index(room):] + [room]))
        if room not in chain:
            below = [visit(t, path + [room]) for t in sorted(rooms[room])]
            chain[room] = [room] + max(below, key=len, default=[])
        return chain[room]

    for room in rooms:
        visit(room, [])
    return {room: len(c) for room, c in chain.items()}, chain


def test_the_import_graph_has_at_most_five_layers():
    layers, chain = room_layers()
    top = max(layers, key=lambda r: (layers[r], r))
    path = " -> ".join(f"{r.removeprefix('jaxcnn.')}({layers[r]})" for r in chain[top])
    assert layers[top] <= MAX_LAYERS, f"{layers[top]} layers (at most {MAX_LAYERS}): {path}"


def test_no_module_level_caches_in_the_library():
    offenders = [f"{_module_name(p)}: {line.strip()}" for p in PACKAGE.rglob("*.py")
                 for line in p.read_text().splitlines() if "lru_cache" in line or "functools.cache" in line]
    assert not offenders, offenders


def _module_level(tree: ast.Module):
    """The statements run when the module is imported (not the bodies of its functions)."""
    stack = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        yield node
        stack.extend(ast.iter_child_nodes(node))


def test_no_module_writes_the_process_environment_at_import():
    """Importing jaxcnn changes no environment variable: a library's import is no place to decide a
    process's settings (cifar10.py once set TensorFlow's log level there)."""
    writes = []
    for path in PACKAGE.rglob("*.py"):
        for node in _module_level(ast.parse(path.read_text())):
            text = ast.unparse(node) if isinstance(node, (ast.Call, ast.Assign, ast.AugAssign)) else ""
            if isinstance(node, ast.Call) and any(k in text for k in ("os.environ.setdefault", "os.environ.update",
                                                                      "os.putenv", "os.environ.pop")):
                writes.append(f"{_module_name(path)}: {text}")
            elif isinstance(node, (ast.Assign, ast.AugAssign)) and "os.environ[" in text.split("=")[0]:
                writes.append(f"{_module_name(path)}: {text}")
    assert not writes, writes
