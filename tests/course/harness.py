"""Running a notebook's cells twice, once as written (diffusers, transformers) and once with its import lines
rewritten to minidiff, and comparing what each cell produces.

Each side has its own namespace and its own working folder; before each cell, on each side, torch's, numpy's and
Python's global generators are seeded with the cell's number, so a cell draws the same noise on both sides
whatever the libraries did with the global generator before it (diffusers without accelerate initialises a
model's weights before loading them). A cell's results are the names it assigns (found in its syntax tree), the
value its last line displays, what it plots and what it prints; each is compared between the sides.

A cell that cannot run on the minidiff side makes the names it assigns stale there, so a later cell that reads one
of them is not run on that side: it inherits the first cell's status (pending or failing), as in a notebook run
top to bottom. The reference side runs every cell that is not skipped.

Run as a script (`python tests/course/harness.py WORKDIR NOTEBOOK...`), in a process whose HF_HOME is the
simulated cache and HF_HUB_OFFLINE=1, so diffusers, transformers and minidiff read it through their own
environment handling, as in a notebook kernel. huggingface_hub.notebook_login does nothing during the run (the
deep dive's cell 2 calls it when ~/.cache/huggingface/token is missing; HOME is an empty folder here).
"""

import ast
import contextlib
import io
import json
import linecache
import os
import random
import re
import sys
import time
import traceback
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from PIL import Image

TESTS = Path(__file__).resolve().parent.parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

from course import stand_ins  # noqa: E402


class PendingFeature(Exception):
    """Raised by the placeholder of a minidiff class that a later issue builds."""


def placeholder(name: str, reason: str) -> type:
    """A class standing for a minidiff class not built yet: importing it works, using it raises PendingFeature."""

    def refuse(*args, **kwargs):
        raise PendingFeature(f"{name} ({reason})")

    return type(name, (), {"__init__": refuse, "from_pretrained": classmethod(refuse),
                           "from_config": classmethod(refuse)})


# --------------------------------------------------------------------------------------------- cell analysis

NESTED = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef, ast.ListComp, ast.SetComp, ast.DictComp,
          ast.GeneratorExp)


def names(node: ast.AST, context: type) -> set[str]:
    """Names loaded (context ast.Load) or bound (ast.Store) in `node`, not looking inside nested scopes."""
    found, todo = set(), [node]
    while todo:
        current = todo.pop()
        if isinstance(current, ast.Name) and isinstance(current.ctx, context):
            found.add(current.id)
        todo.extend(child for child in ast.iter_child_nodes(current) if not isinstance(child, NESTED))
    return found


def free_names(scope: ast.AST) -> set[str]:
    """The names a nested scope (function, class, lambda, comprehension) reads from outside itself."""
    bound = {scope.name} if isinstance(scope, ast.FunctionDef | ast.ClassDef) else set()
    loads = set()
    for node in ast.walk(scope):
        if isinstance(node, ast.arg):
            bound.add(node.arg)
        elif isinstance(node, ast.Name):
            (bound if isinstance(node.ctx, ast.Store) else loads).add(node.id)
        elif isinstance(node, ast.FunctionDef | ast.ClassDef) and node is not scope:
            bound.add(node.name)
    return loads - bound


def outer_nodes(node: ast.AST):
    """`node` and what it contains, down to (and including) nested defs, classes and lambdas but not into them."""
    todo = [node]
    while todo:
        current = todo.pop()
        yield current
        if current is node or not isinstance(current, NESTED):
            todo.extend(ast.iter_child_nodes(current))


def stored_bases(node: ast.AST) -> set[str]:
    """The variables a statement changes: assigned names, and the bases of assigned attributes and items
    (`pipe.scheduler = ...` changes `pipe`; `token_embeddings[0, i] = ...` changes `token_embeddings`)."""
    if isinstance(node, NESTED):  # a def or class binds its name; what its body assigns stays inside it
        return {node.name} if isinstance(node, ast.FunctionDef | ast.ClassDef) else set()
    found = names(node, ast.Store)
    for child in outer_nodes(node):
        if isinstance(child, ast.Attribute | ast.Subscript) and isinstance(child.ctx, ast.Store):
            base = child.value
            while isinstance(base, ast.Attribute | ast.Subscript):
                base = base.value
            if isinstance(base, ast.Name):
                found.add(base.id)
        elif isinstance(child, ast.Import | ast.ImportFrom):
            found |= {(alias.asname or alias.name).split(".")[0] for alias in child.names}
        elif isinstance(child, ast.FunctionDef | ast.ClassDef):
            found.add(child.name)
    return found


def reads_and_writes(tree: ast.Module) -> tuple[set[str], set[str]]:
    """(names the cell reads before assigning them, names it assigns), statement by statement in order."""
    reads, written = set(), set()

    def visit(statements):
        for statement in statements:
            if isinstance(statement, NESTED):  # a def or class: what its body reads from outside
                loads = free_names(statement)
            else:
                loads = names(statement, ast.Load)
                loads |= {n for scope in ast.walk(statement) if isinstance(scope, NESTED) for n in free_names(scope)}
            if isinstance(statement, ast.For | ast.While | ast.If | ast.With | ast.Try):
                header = [statement.iter] if isinstance(statement, ast.For) else []
                header += [statement.test] if isinstance(statement, ast.While | ast.If) else []
                header += [item.context_expr for item in getattr(statement, "items", [])]
                for node in header:
                    reads.update(names(node, ast.Load) - written)
                written.update(names(statement.target, ast.Store) if isinstance(statement, ast.For) else set())
                for item in getattr(statement, "items", []):
                    if item.optional_vars is not None:
                        written.update(names(item.optional_vars, ast.Store))
                for block in ("body", "orelse", "finalbody"):
                    visit(getattr(statement, block, []))
                for handler in getattr(statement, "handlers", []):
                    visit(handler.body)
                continue
            reads.update(loads - written)
            written.update(stored_bases(statement))

    visit(tree.body)
    return reads, written


def ipython_lines(source: str) -> str:
    """IPython's rewrite of shell lines: `!cmd` -> get_ipython().system('cmd'), keeping the indentation."""
    lines = []
    for line in source.split("\n"):
        stripped = line.lstrip()
        if stripped.startswith("!"):
            line = line[: len(line) - len(stripped)] + f"get_ipython().system({stripped[1:]!r})"
        lines.append(line)
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ comparison

ATOL = 1e-5  # see tests/test_course.py


def difference(expected, got) -> tuple[bool, str] | None:
    """None when `expected` is not a value (a module, a pipeline, a function); else (equal, what differs)."""
    if isinstance(expected, torch.Generator):
        return compare_arrays(expected.get_state().numpy(), as_array(got, torch.Generator))
    if isinstance(expected, torch.Tensor):
        return compare_arrays(expected.detach().cpu(), got.detach().cpu() if isinstance(got, torch.Tensor) else got)
    if isinstance(expected, np.ndarray | Image.Image):
        return compare_arrays(expected, got)
    if isinstance(expected, bool | int | float | str | type(None)):
        same = expected == got or (isinstance(expected, float) and isinstance(got, float)
                                   and abs(expected - got) <= ATOL)
        return same, "" if same else f"{got!r} != {expected!r}"
    if isinstance(expected, list | tuple):
        if not isinstance(got, list | tuple) or len(got) != len(expected):
            return False, f"a {type(got).__name__} of {len(got) if hasattr(got, '__len__') else '?'}, " \
                          f"not a {type(expected).__name__} of {len(expected)}"
        results = [difference(e, g) for e, g in zip(expected, got, strict=True)]
        if all(r is None for r in results):
            return None
        bad = [(i, r[1]) for i, r in enumerate(results) if r is not None and not r[0]]
        return not bad, "; ".join(f"[{i}] {what}" for i, what in bad[:3])
    if isinstance(expected, Mapping):
        results = {}
        for key in expected:
            try:
                value = got[key] if isinstance(got, Mapping) else getattr(got, key)
            except (KeyError, AttributeError, TypeError):
                results[key] = (False, "missing")
                continue
            results[key] = difference(expected[key], value)
        results = {k: r for k, r in results.items() if r is not None}
        if not results:
            return None
        bad = {k: r[1] for k, r in results.items() if not r[0]}
        return not bad, "; ".join(f"[{k!r}] {what}" for k, what in list(bad.items())[:3])
    return None


def as_array(value, kind):
    return value.get_state().numpy() if isinstance(value, kind) else value


def compare_arrays(expected, got) -> tuple[bool, str]:
    kind = type(expected).__name__
    if isinstance(expected, Image.Image):
        if not isinstance(got, Image.Image):
            return False, f"a {type(got).__name__}, not a PIL image"
        if (got.mode, got.size) != (expected.mode, expected.size):
            return False, f"PIL {got.mode} {got.size} != {expected.mode} {expected.size}"
        expected, got = np.asarray(expected, dtype=np.int64), np.asarray(got, dtype=np.int64)
        pixels = int((expected != got).sum())
        return pixels == 0, f"{pixels} pixels differ (max {np.abs(expected - got).max()})" if pixels else "0.0"
    if not isinstance(got, type(expected)):
        return False, f"a {type(got).__name__}, not a {kind}"
    if tuple(got.shape) != tuple(expected.shape) or got.dtype != expected.dtype:
        return False, f"{tuple(got.shape)} {got.dtype} != {tuple(expected.shape)} {expected.dtype}"
    if expected.size == 0 if isinstance(expected, np.ndarray) else expected.numel() == 0:
        return True, "0.0"
    floating = expected.dtype.is_floating_point if isinstance(expected, torch.Tensor) else \
        np.issubdtype(expected.dtype, np.floating)
    if not floating:
        same = bool((expected == got).all())
        return same, "equal" if same else "values differ"
    diff = float(np.nanmax(np.abs(np.asarray(expected, np.float64) - np.asarray(got, np.float64))))
    nans = bool((np.isnan(np.asarray(expected)) != np.isnan(np.asarray(got))).any())
    return diff <= ATOL and not nans, f"{diff:.3g}" + (" (NaN pattern differs)" if nans else "")


# --------------------------------------------------------------------------------------------------- running


class Side:
    """One run of the notebook: a namespace, a working folder, and what the last cell produced."""

    def __init__(self, name: str, folder: Path, namespace: dict, plotted: list):
        self.name, self.folder, self.namespace, self.plotted = name, folder, namespace, plotted
        self.plots, self.printed, self.shown = [], "", None

    def run(self, number: int, source: str, filename: str) -> None:
        """exec one cell as IPython does: the last line, if an expression, is evaluated and kept (displayed)."""
        started = time.time()
        linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
        tree = ast.parse(source, filename)
        last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
        for seed in (torch.manual_seed, np.random.seed, random.seed):
            seed(number)
        self.plotted.clear()
        self.shown, printed = None, io.StringIO()
        cwd = os.getcwd()
        os.chdir(self.folder)
        try:
            with contextlib.redirect_stdout(printed):
                exec(compile(tree, filename, "exec"), self.namespace)
                if last is not None:
                    self.shown = eval(compile(ast.Expression(last.value), filename, "eval"), self.namespace)
        finally:
            os.chdir(cwd)
            self.printed, self.plots = printed.getvalue(), list(self.plotted)
            self.seconds = round(time.time() - started, 2)


def run_notebook(plan, to_minidiff, work: Path) -> dict:
    """Run `plan`'s notebook on both sides; returns {"cells": {n: {...}}, "seconds": ...}."""
    start = time.time()
    report, tainted = {}, {}  # tainted: name -> the status of the cell that left it stale on the minidiff side
    reference_tainted = set()  # names stale on the reference side too (a pending cell its reference cannot run)
    plotted, sides = [], {}  # plotted: what pyplot records while a cell runs
    for name in ("reference", "minidiff"):
        folder = work / name
        folder.mkdir(parents=True, exist_ok=True)
        namespace = {"__name__": "__main__", "device": "cpu", "torch_device": "cpu",
                     "get_ipython": stand_ins.IPythonShell}
        sides[name] = Side(name, folder, namespace, plotted)
        plan.setup(sides[name])
    reference, ours = sides["reference"], sides["minidiff"]
    settle_optional_imports(plan.cells.values())
    replaced = stand_ins.install(stand_ins.modules(plotted))
    import huggingface_hub

    login, huggingface_hub.notebook_login = huggingface_hub.notebook_login, lambda *args, **kwargs: None
    try:
        with pending_placeholders(plan.pending):
            for number, verbatim in plan.cells.items():
                started = time.time()
                entry = report[number] = run_cell(plan, number, verbatim, to_minidiff, reference, ours, tainted,
                                                  reference_tainted)
                entry["seconds"] = round(time.time() - started, 2)
    finally:
        stand_ins.uninstall(replaced)
        huggingface_hub.notebook_login = login
    return {"cells": report, "seconds": round(time.time() - start, 1)}


def settle_optional_imports(cells) -> None:
    """Before the stand-ins go into sys.modules: import what the cells import from diffusers and transformers
    (both import lazily), and let transformers decide now, for good, which optional packages are installed (its
    is_*_available checks are cached at the first call; one made while a stand-in torchvision is in sys.modules
    would say yes and import torchvision.transforms.InterpolationMode)."""
    import diffusers
    import transformers
    from transformers.utils import import_utils

    for name in dir(import_utils):
        check = getattr(import_utils, name)
        if name.startswith("is_") and name.endswith("_available") and hasattr(check, "cache_info"):
            with contextlib.suppress(Exception):
                check()
    for source in cells:
        for library, imported in re.findall(r"from (diffusers|transformers) import (\([^)]*\)|[^\n]+)", source):
            module = diffusers if library == "diffusers" else transformers
            for name in re.findall(r"\w+", imported):
                getattr(module, name)


@contextlib.contextmanager
def pending_placeholders(pending: dict):
    """Placeholders on the minidiff module for the classes a later issue builds (and only while they are missing)."""
    import minidiff

    added = [name for name in pending if not hasattr(minidiff, name)]
    for name in added:
        setattr(minidiff, name, placeholder(name, pending[name]))
    try:
        yield
    finally:
        for name in added:
            delattr(minidiff, name)


def run_cell(plan, number, verbatim, to_minidiff, reference, ours, tainted, reference_tainted) -> dict:
    if all(not line.strip() or line.lstrip().startswith("#") for line in verbatim.split("\n")):
        return {"status": "skipped: no code (comments only)"}
    if number in plan.skipped:
        for side in (reference, ours):
            plan.after(number, side)
        return {"status": f"skipped: {plan.skipped[number]}"}
    source = ipython_lines(plan.edited(number, verbatim))
    reads, writes = reads_and_writes(ast.parse(source))
    entry = {"size_edit": number in plan.size_edits}
    if number in plan.pending_cells:
        entry["status"] = f"pending: {plan.pending_cells[number]}"
        tainted.update(dict.fromkeys(writes, entry["status"]))
        return entry
    stale = sorted(name for name in reads if name in tainted)
    stale_on_both = [name for name in stale if name in reference_tainted]
    if stale_on_both:  # neither side has what this cell needs
        status = tainted[stale_on_both[0]]
        entry["status"] = status if status.startswith("pending") else f"reference fails: needs {stale_on_both[0]} " \
                                                                      f"({status})"
        tainted.update(dict.fromkeys(writes, status))
        reference_tainted.update(writes)
        return entry
    try:
        reference.run(number, source, f"<{plan.name} cell {number}>")
    except Exception as error:
        pending = [name for name in plan.pending if name in source]
        pending += [tainted[name] for name in stale if tainted[name].startswith("pending")]
        if not pending:
            entry["status"] = "reference fails: " + traceback.format_exc(limit=-3)
            tainted.update(dict.fromkeys(writes, f"the reference fails at cell {number}"))
            reference_tainted.update(writes)
            return entry
        # the reference of a feature minidiff does not have yet may need what this machine lacks (scipy for
        # diffusers' LMSDiscreteScheduler): the cell waits on both sides
        reason = plan.pending.get(pending[0], pending[0])
        entry["status"] = f"pending: {reason.removeprefix('pending: ')} (reference: {type(error).__name__}: " \
                          f"{str(error).strip().splitlines()[0]})"
        tainted.update(dict.fromkeys(writes, entry["status"]))
        reference_tainted.update(writes)
        return entry
    plan.after(number, reference)
    if stale:
        status = tainted[stale[0]]
        entry["status"] = status if status.startswith("pending") else f"fails: needs {stale[0]} ({status})"
        tainted.update(dict.fromkeys(writes, status))
        return entry
    before = {name: id(ours.namespace.get(name)) for name in writes}
    try:
        ours.run(number, to_minidiff(source), f"<{plan.name} cell {number} (minidiff)>")
    except Exception as error:
        if isinstance(error, PendingFeature):
            entry["status"] = f"pending: {error}"
        else:
            entry["status"] = f"fails: {type(error).__name__}: {error}"
            entry["traceback"] = traceback.format_exc(limit=-4)
        # what the cell assigned before it stopped stays usable; the rest is stale
        unchanged = {name for name in writes if name not in ours.namespace or id(ours.namespace[name]) == before[name]}
        reason = entry["status"] if isinstance(error, PendingFeature) else f"fails at cell {number}"
        tainted.update(dict.fromkeys(unchanged, reason))
        return entry
    plan.after(number, ours)
    entry["seconds by side"] = [reference.seconds, ours.seconds]
    for name in writes:
        tainted.pop(name, None)
    entry.update(compare_results(plan, number, writes, reference, ours))
    return entry


def compare_results(plan, number, writes, reference, ours) -> dict:
    """Each value the cell assigned, displayed or plotted: (equal, max difference or what differs)."""
    results = {}
    for name in sorted(writes - plan.not_compared.get(number, set())):
        if name in reference.namespace:
            result = difference(reference.namespace[name], ours.namespace.get(name, Missing()))
            if result is not None:
                results[name] = result
    extra = plan.extras(number, ours)
    for name, expected in plan.extras(number, reference).items():
        result = difference(expected, extra.get(name, Missing()))
        if result is not None:
            results[name] = result
    shown = difference(reference.shown, ours.shown) if reference.shown is not None else None
    if shown is not None:
        results[f"Out[{number}]"] = shown
    for i, (call, expected) in enumerate(reference.plots):
        got = ours.plots[i][1] if i < len(ours.plots) else None
        results[f"plt.{call}#{i}"] = (False, "not plotted") if got is None else compare_arrays(expected, got)
    different = {name: what for name, (same, what) in results.items() if not same}
    entry = {"compared": {name: what for name, (same, what) in results.items()}}
    if reference.printed != ours.printed:
        entry["printed_differs"] = [reference.printed[-300:], ours.printed[-300:]]
    entry["status"] = "ran, matched" if not different else "ran, differs: " + "; ".join(
        f"{name}: {what}" for name, what in different.items())
    return entry


class Missing:
    def __repr__(self):
        return "<not assigned>"


def main(work: str, *notebooks: str) -> None:
    """Run each notebook in `work`/<notebook>/ and write `work`/<notebook>.json: one process for all of them,
    so the libraries are imported once."""
    import test_course

    torch.set_num_threads(1)  # as tests/conftest.py: the tiny ops run faster on one thread
    for notebook in notebooks:
        report = run_notebook(test_course.PLANS[notebook], test_course.to_minidiff, Path(work) / notebook)
        (Path(work) / f"{notebook}.json").write_text(json.dumps(report, indent=1, default=str))


if __name__ == "__main__":
    main(*sys.argv[1:])
