"""The house rules of supervisor/ (its __init__ docstrings), checked on the import graph.

Every import statement counts, lazy ones inside functions too: a rule that only holds at
module level is no rule.
"""
import ast
from pathlib import Path

from helpers import ROOT

SUPERVISOR = ROOT / "supervisor"
RUN = {"supervisor.cli", "supervisor.supervise", "supervisor.attempt", "supervisor.config"}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """The supervisor modules that `path` imports, as dotted names."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("supervisor"):
            assert node.level == 0, f"{path}: relative import (the house uses absolute ones)"
            for alias in node.names:  # `from supervisor.output import lines` imports a module
                sub = f"{node.module}.{alias.name}"
                found.add(sub if (ROOT / (sub.replace(".", "/") + ".py")).exists() else node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("supervisor"))
    return found


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports_of(p) for p in SUPERVISOR.rglob("*.py")}


def test_watch_imports_nothing_but_watch():
    bad = {m: sorted(i - {x for x in i if x.startswith("supervisor.watch")})
           for m, i in graph().items() if m.startswith("supervisor.watch")}
    assert {m: b for m, b in bad.items() if b} == {}


def test_output_and_forensics_never_import_the_run_or_watch():
    g = graph()
    for room, allowed_outside in (("supervisor.output", {"supervisor.child", "supervisor.config"}),
                                  ("supervisor.forensics", {"supervisor.output.lines", "supervisor.output.events",
                                                            "supervisor.config"})):
        for mod, imported in g.items():
            if mod.startswith(room):
                outside = {i for i in imported if not i.startswith(room)}
                assert outside <= allowed_outside, f"{mod} imports {sorted(outside - allowed_outside)}"


def test_report_reads_only_formats_and_pure_parsers():
    allowed = {"supervisor.output.events", "supervisor.output.lines", "supervisor.watch.eta",
               "supervisor.watch.progress_files"}
    for mod, imported in graph().items():
        if mod.startswith("supervisor.report"):
            outside = {i for i in imported if not i.startswith("supervisor.report")}
            assert outside <= allowed, f"{mod} imports {sorted(outside - allowed)}"


def test_no_room_imports_the_runs_loop():
    for mod, imported in graph().items():
        if mod.count(".") >= 2:  # inside a room
            assert not (imported & RUN - {"supervisor.config"}), f"{mod} imports the run's loop"


def test_no_module_imports_one_that_imports_it_back():
    g = graph()

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        for nxt in g.get(start, ()):
            if nxt == goal or (nxt not in seen and not seen.add(nxt) and reaches(nxt, goal, seen)):
                return True
        return False

    cycles = sorted(m for m in g if reaches(m, m, set()))
    assert cycles == []


def test_the_rules_see_a_lazy_import(tmp_path):
    """A check that cannot fail proves nothing: an import inside a function is seen."""
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from supervisor.output import lines\n")
    assert imports_of(probe) == {"supervisor.output.lines"}
