"""Loading a model never executes code from it: no module of the SDK imports pickle (or a library
built on it), torch.load is never called without weights_only=True, np.load never with pickles allowed."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted(p for d in ("ondevice", "converters", "runtimes", "benchmarks", "scripts")
                 for p in (ROOT / d).rglob("*.py"))
UNPICKLERS = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}


def calls(tree: ast.AST, dotted: str):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and ast.unparse(node.func) == dotted:
            yield node


def keyword(call: ast.Call, name: str):
    return next((ast.literal_eval(k.value) for k in call.keywords if k.arg == name), None)


def unpickling(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
                for alias in (node.names if isinstance(node, ast.Import) else [ast.alias(node.module or "")])}
    found = [f"imports {m}" for m in sorted(imported & UNPICKLERS)]
    found += [f"line {c.lineno}: torch.load without weights_only=True" for c in calls(tree, "torch.load")
              if keyword(c, "weights_only") is not True]
    found += [f"line {c.lineno}: np.load without allow_pickle=False" for c in calls(tree, "np.load")
              if keyword(c, "allow_pickle") is not False]
    found += [f"line {c.lineno}: {f}" for f in ("pd.read_pickle", "eval", "exec") for c in calls(tree, f)]
    return found


def test_no_source_file_can_unpickle():
    offenders = {str(p.relative_to(ROOT)): found for p in SOURCES if (found := unpickling(p))}
    assert len(SOURCES) > 50 and offenders == {}


def test_the_check_sees_an_unpickler(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import pickle\nimport numpy as np\nx = np.load('a.npy', allow_pickle=True)\n")
    assert unpickling(bad) == ["imports pickle", "line 3: np.load without allow_pickle=False"]
