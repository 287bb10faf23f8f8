"""`pip install magvit-supervise` never touches the user's torch (SPEC 9).

The import-graph check is pure and quick. The install check builds a wheel from a copy of
the sources, installs it without extras into a fresh venv (network: PyPI for psutil and
py-spy) and runs the installed command there, outside the repository, so nothing can come
from the source tree or from this venv's torch.
"""
from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import ROOT

SUPERVISOR = ROOT / "supervisor"
# Packages the supervisor must never import: the trainer's stack. matplotlib is the one
# exception, for magvit-report's --png, and only inside supervisor/report/plot.py.
FORBIDDEN = {"torch", "trainer", "numpy", "tqdm", "matplotlib", "torchvision"}
MAY_IMPORT = {"report/plot.py": {"matplotlib"}}  # magvit-report's picture, imported inside draw() only


def imported_top_names(path: Path) -> set[str]:
    """Top-level package names that a module imports anywhere (module level or inside functions)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", ""))
              in ("import_module", "__import__") and node.args
              and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            names.add(node.args[0].value.split(".")[0])
    return names


def test_supervisor_package_imports_nothing_of_the_trainer_or_torch():
    """Grep the import graph: every import statement in supervisor/, also lazy ones in functions."""
    offenders = {}
    for path in sorted(SUPERVISOR.rglob("*.py")):
        bad = (imported_top_names(path) & FORBIDDEN) - MAY_IMPORT.get(path.relative_to(SUPERVISOR).as_posix(), set())
        if bad:
            offenders[str(path.relative_to(ROOT))] = sorted(bad)
    assert offenders == {}, f"the supervisor imports the trainer's stack: {offenders}"


def test_import_graph_check_can_fail(tmp_path):
    """The grep above sees lazy and from-imports (a check that cannot fail proves nothing)."""
    mod = tmp_path / "m.py"
    mod.write_text("import os\ndef f():\n    from trainer.loop import x\n    import torch.nn\n"
                   "    importlib.import_module('numpy')\n")
    assert {"trainer", "torch", "numpy"} <= imported_top_names(mod)


def build_wheel(dest: Path) -> Path:
    """Build the project's wheel from a copy of its sources (the working tree stays clean)."""
    src = dest / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    for pkg in ("supervisor", "trainer"):
        shutil.copytree(ROOT / pkg, src / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(dest),
                    str(src)], check=True, timeout=240, stdin=subprocess.DEVNULL)
    (wheel,) = dest.glob("magvit_supervise-*.whl")
    return wheel


def clean_env(venv: Path) -> dict[str, str]:
    """An environment in which only the fresh venv is Python: no PYTHONPATH, no repo on the path."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MAGVIT_", "PYTHON", "VIRTUAL_ENV"))}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["VIRTUAL_ENV"] = str(venv)
    return env


HANG = r"""
import os, threading
def stuck_waiting_for_godot():
    open(os.environ["MAGVIT_PROGRESS_FILE"], "w").write("step 1\n")
    threading.Event().wait()  # never set: a hang, as a lost collective is
stuck_waiting_for_godot()
"""


@pytest.mark.heavy
@pytest.mark.timeout(420)
def test_wheel_without_extras_installs_no_torch_and_supervises(tmp_path):
    wheel = build_wheel(tmp_path)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    env = clean_env(venv)
    vpy = str(venv / "bin" / "python")
    subprocess.run([vpy, "-m", "pip", "install", "--quiet", str(wheel)], check=True, timeout=240,
                   env=env, cwd=tmp_path, stdin=subprocess.DEVNULL)

    listing = subprocess.run([vpy, "-m", "pip", "list", "--format", "json"], check=True,
                             capture_output=True, env=env, cwd=tmp_path, timeout=60)
    installed = {p["name"].lower().replace("_", "-") for p in json.loads(listing.stdout)}
    assert {"magvit-supervise", "psutil", "py-spy"} <= installed
    assert installed & {"torch", "numpy", "matplotlib", "tqdm"} == set(), sorted(installed)

    # Every supervisor module imports in the bare venv (a top-level torch or matplotlib
    # import anywhere would fail here), and from the venv, not from the repository.
    probe = ("import importlib, pkgutil, supervisor; print(supervisor.__file__);"
             "[importlib.import_module('supervisor.' + m.name) for m in pkgutil.iter_modules(supervisor.__path__)"
             " if m.name != '__main__']")
    r = subprocess.run([vpy, "-c", probe], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().startswith(str(venv)), r.stdout

    sup = str(venv / "bin" / "magvit-supervise")
    r = subprocess.run([sup, "--heartbeat", "0", "--", "python", "-c", "print(1)"], capture_output=True,
                       text=True, env=env, cwd=tmp_path, timeout=60, stdin=subprocess.DEVNULL)
    assert (r.returncode, r.stdout) == (0, "1\n"), r.stderr
    assert "exit status=0 reason=exited" in r.stderr

    # A stall is still diagnosed with the Python stack of the hung child.
    r = subprocess.run([sup, "--heartbeat", "0", "--progress-file", "p.txt", "--events", "ev.jsonl", "--stall-timeout", "1.5",
                        "--startup-grace", "60", "--kill-grace", "1", "--", "python", "-c", HANG],
                       capture_output=True, text=True, env=env, cwd=tmp_path, timeout=90,
                       stdin=subprocess.DEVNULL)
    assert r.returncode == 124, r.stderr[-3000:]
    assert "STALL no progress" in r.stderr
    assert "diagnosis:" in r.stderr
    assert "stuck_waiting_for_godot" in r.stderr, r.stderr[-3000:]

    # magvit-report's text summary needs no extra either (only --png wants [report]).
    r = subprocess.run([str(venv / "bin" / "magvit-report"), "ev.jsonl"], capture_output=True,
                       text=True, env=env, cwd=tmp_path, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "STALL" in r.stdout and "stuck_waiting_for_godot" in r.stdout, r.stdout
