"""The package layout, checked from the source text (nothing here imports minidiff).

minidiff reads bottom-up, as the course does. At the bottom is a base of plain helpers: configs, seeded noise
and images. Above it are the two things a diffusion model is made of, the networks (models) and the noise
schedules (schedulers), and neither knows about the other. Pipelines put the two together to sample. Loading
reads weights from disk into them. Convert (hub checkpoints to minidiff folders) and training build on loading.
Bench, demo and the two CLIs sit on top. A file imports only from its own group and from lower layers, so each
layer can be read and tested without the layers above it, and no change up the stack can break one below.
minidiff/__init__.py is the public face. It may import everything, so nothing inside the package imports it
(apart from __version__). Module-level imports never form a cycle, and the README's concept map names only
files and names that exist. The helpers take the repository root so they can be tried on a made-up tree.
"""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# The layer table. A file belongs to the first group that lists it or a folder above it ("minidiff/models/").
# It may import its own group and every group of a lower layer: models and schedulers never import each
# other, and neither do convert and training.
LAYERS = {  # group: (layer, paths)
    "base": (0, ["minidiff/config.py", "minidiff/noise.py", "minidiff/images.py", "minidiff/logging.py"]),
    "models": (1, ["minidiff/models/"]),
    "schedulers": (1, ["minidiff/schedulers/"]),
    "pipelines": (2, ["minidiff/pipelines/"]),
    "loading": (3, ["minidiff/loading/"]),
    "convert": (4, ["minidiff/convert/"]),
    "training": (4, ["minidiff/training/"]),
    "apps": (5, ["minidiff/bench/", "minidiff/demo/", "train.py", "sample.py"]),  # any layer, but not the face
}
FACE = "minidiff/__init__.py"  # may import anything. Inside minidiff, only `from minidiff import __version__`
# The one door up: the course calls from_pretrained / save_pretrained on a model, scheduler or pipeline class,
# which lives below the code that reads and writes every format. Those methods (and a pipeline's
# load_textual_inversion) may import these modules inside their body, and nothing else may.
DOOR_METHODS = {"from_pretrained", "save_pretrained", "load_textual_inversion"}
DOORS = {"minidiff/convert/pretrained.py", "minidiff/loading/model_folder.py", "minidiff/loading/textual_inversion.py"}
SCRIPTS = ["train.py", "sample.py"]


def source_files(root: Path) -> list[str]:
    files = sorted(p.relative_to(root).as_posix() for p in (root / "minidiff").rglob("*.py"))
    return files + [s for s in SCRIPTS if (root / s).is_file()]


def parse(root: Path, file: str) -> ast.Module:
    return ast.parse((root / file).read_text(), filename=file)


def group_of(file: str) -> str | None:
    for group, (_, paths) in LAYERS.items():
        if any(file == p or (p.endswith("/") and file.startswith(p)) for p in paths):
            return group
    return None


def module_file(root: Path, module: str) -> str | None:
    """minidiff.models -> minidiff/models/__init__.py (a package wins over a same-named .py, as in Python)."""
    base = module.replace(".", "/")
    return next((f for f in (f"{base}/__init__.py", f"{base}.py") if (root / f).is_file()), None)


def imported(root: Path, file: str, nodes):
    """(module, its file or None if missing, name or None) for each minidiff import among `nodes`."""
    parts = file[:-3].split("/")
    package = parts[:-1]  # for __init__.py as well: minidiff/models/__init__.py is the package minidiff.models
    for node in nodes:
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "minidiff" or alias.name.startswith("minidiff."):
                    yield alias.name, module_file(root, alias.name), None
        elif isinstance(node, ast.ImportFrom):
            if node.level and node.level - 1 >= len(package):
                continue  # a relative import above the top package (or in a script): not ours to judge
            base = ".".join(package[: len(package) - node.level + 1]) if node.level else ""
            base = ".".join(filter(None, [base, node.module]))
            if base != "minidiff" and not base.startswith("minidiff."):
                continue
            for alias in node.names:
                if sub := module_file(root, f"{base}.{alias.name}"):
                    yield f"{base}.{alias.name}", sub, None  # `from minidiff import clip`: the submodule
                else:
                    yield base, module_file(root, base), alias.name


def eager_statements(body):
    """The statements run at import time: everything but function bodies and `if TYPE_CHECKING:` blocks."""
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            yield from eager_statements(node.orelse)
            continue
        yield node
        for field in ("body", "orelse", "finalbody", "handlers"):
            yield from eager_statements(getattr(node, field, []))


def layering_violations(root: Path) -> list[str]:
    problems = []
    for file in source_files(root):
        group = group_of(file)
        if file != FACE and group is None:
            problems.append(f"put {file} in a layer (LAYERS in tests/test_layout.py)")
            continue
        tree = parse(root, file)
        through_door = {id(n) for f in ast.walk(tree) if isinstance(f, ast.FunctionDef) and f.name in DOOR_METHODS
                        for n in ast.walk(f)}
        nodes = [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
        for node, (module, target, name) in ((n, found) for n in nodes for found in imported(root, file, [n])):
            target_group = group_of(target) if target else None
            if id(node) in through_door and target in DOORS:
                continue
            if target is None:
                problems.append(f"{file} imports {module} (no such module)")
            elif file == FACE:
                continue
            elif target == FACE:
                if file.startswith("minidiff/") and name != "__version__":
                    problems.append(f"{file} imports {module}{'.' + name if name else ''} ({group} -> the public "
                                    "face, which imports everything; import it from where it is defined)")
            elif target_group and target_group != group and LAYERS[target_group][0] >= LAYERS[group][0]:
                problems.append(f"{file} imports {module} ({group}, layer {LAYERS[group][0]} -> "
                                f"{target_group}, layer {LAYERS[target_group][0]})")
    return problems


def import_cycle(root: Path) -> list[str] | None:
    """One cycle of module-level imports, as a list of files that ends where it starts, or None."""
    graph = {f: sorted({t for _, t, _ in imported(root, f, eager_statements(parse(root, f).body)) if t})
             for f in source_files(root)}
    state, stack = {}, []

    def visit(node):  # depth first: an edge back to a file still open closes a cycle
        state[node] = "open"
        stack.append(node)
        for nxt in graph.get(node, []):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    return next((c for f in graph if f not in state and (c := visit(f))), None)


PATH_ITEM = re.compile(r"(minidiff/(?:\w+/)*(?:\w+\.py)?|train\.py|sample\.py)(?::([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*))?")
NAME_ITEM = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*")


def concept_map(root: Path):
    """(rows, [(file, name or None, class of the cell's last A.b or None)], count of backticked items ignored)."""
    section = re.search(r"^## Concept map[ \t]*\n(.*?)(?=^## |\Z)", (root / "README.md").read_text(), re.M | re.S)
    assert section, 'README.md has no "## Concept map" section'
    table = [line for line in section.group(1).splitlines() if line.lstrip().startswith("|")]
    rows = [line for line in table[1:] if not re.fullmatch(r"[\s|:-]+", line)]  # drop the header and the rule
    items, ignored = [], 0
    for row in rows:
        cells = row.strip().strip("|").split("|")
        file = cls = None
        for item in re.findall(r"`([^`]+)`", cells[1] if len(cells) > 1 else ""):
            if m := PATH_ITEM.fullmatch(item):
                file, name = m.groups()
                cls = name.split(".")[0] if name and "." in name else None
                items.append((file, name, None))
            elif NAME_ITEM.fullmatch(item):
                items.append((file, item, cls))  # a bare name: in the cell's last file (or its last class)
            else:
                ignored += 1
    return rows, items, ignored


def defines(tree: ast.AST, dotted: str) -> bool:
    """Whether `A` (top-level def, class or assignment) or `A.b` (def or assignment in class A's body) exists."""
    for part in dotted.split("."):
        if not isinstance(tree, (ast.Module, ast.ClassDef)):
            return False
        tree = next((n for n in tree.body if part in _names(n)), None)
    return tree is not None


def _names(node: ast.stmt) -> set[str]:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return {node.name}
    targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
    names = set()
    while targets:  # `a = ...`, `a: int = ...`, `a, (b, *c) = ...`; not `self.a = ...`
        t = targets.pop()
        names |= {t.id} if isinstance(t, ast.Name) else set()
        targets += getattr(t, "elts", []) + ([t.value] if isinstance(t, ast.Starred) else [])
    return names


def concept_map_problems(root: Path) -> list[str]:
    problems = []
    for file, name, cls in concept_map(root)[1]:
        if file is None:
            problems.append(f"README concept map: `{name}` comes before any file in its cell")
        elif file.endswith("/"):  # a folder: say which of its files to name instead
            found = [f for f in source_files(root) if f.startswith(file) and name and defines(parse(root, f), name)]
            where = ", ".join(found) or "defined nowhere in it"
            problems.append(f"README concept map: {file}:{name} names a folder, not a file ({where})")
        elif not (root / file).is_file() or name and not (
                defines(parse(root, file), name) or cls and defines(parse(root, file), f"{cls}.{name}")):
            problems.append(f"README concept map: {file}{':' + name if name else ''} does not exist")
    return problems


def test_layers_import_one_way():
    problems = layering_violations(ROOT)
    assert not problems, "imports go down the layers (LAYERS in tests/test_layout.py):\n" + "\n".join(problems)


def test_no_import_cycles():
    cycle = import_cycle(ROOT)
    assert not cycle, ("module-level imports form a cycle (move the shared code down, or import lazily inside "
                       "the function that needs it): " + " -> ".join(cycle or []))


def test_concept_map_names_exist():
    rows, items, ignored = concept_map(ROOT)
    assert len(rows) >= 20, f"the README concept map has {len(rows)} rows; expected at least 20"
    assert len(items) > ignored, f"only {len(items)} concept map items parse as file:name, {ignored} do not"
    problems = concept_map_problems(ROOT)
    assert not problems, "\n".join(problems)


def test_the_door_up_is_only_from_pretrained(tmp_path):
    for file in ("minidiff/__init__.py", "minidiff/models/__init__.py", "minidiff/convert/__init__.py",
                 "minidiff/convert/pretrained.py"):
        (tmp_path / file).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / file).write_text("")
    (tmp_path / "minidiff/models/unet.py").write_text(
        "class UNet:\n"
        "    @classmethod\n"
        "    def from_pretrained(cls, path):\n"
        "        from minidiff.convert.pretrained import load_model\n"
        "    def cheat(self):\n"
        "        from minidiff.convert.pretrained import load_model\n")
    problems = layering_violations(tmp_path)
    assert len(problems) == 1 and "models, layer 1 -> convert, layer 4" in problems[0], problems
