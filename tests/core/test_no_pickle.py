"""No pickle anywhere in the package: a static check of every module's source, beside the runtime test in
``tests/core/test_errors.py`` (a legacy ``adapter_model.bin`` holding an object is refused before it runs).

Unpickling runs arbitrary code, so a checkpoint from the Hub must never reach ``pickle.load`` or a ``torch.load``
that may unpickle. The check reads the syntax tree, not text, so a comment or docstring that mentions pickle is fine
and an aliased import (``import pickle as p``) is still caught.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import peftkit

PACKAGE = Path(peftkit.__file__).parent
MODULES = sorted(PACKAGE.rglob("*.py"))
# Modules that read serialized Python objects; none is allowed.
UNPICKLERS = {"pickle", "_pickle", "cPickle", "dill", "cloudpickle", "joblib", "shelve", "marshal", "copyreg"}
# torch.save writes a pickle. The one writer allowed is the Trainer's training_args.bin, which transformers' own
# Trainer writes the same way (peftkit never reads it back; transformers does, with weights_only=False, on resume).
PICKLE_WRITERS_ALLOWED = {("integrations/trainer.py", "TRAINING_ARGS_NAME")}


def _calls(tree: ast.AST, dotted: str) -> list[ast.Call]:
    """Calls whose callee is written ``dotted`` (e.g. ``torch.load``), or its last part imported bare."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            callee = ast.unparse(node.func)
            if callee == dotted or callee.endswith("." + dotted):
                found.append(node)
    return found


def _keyword(call: ast.Call, name: str) -> str | None:
    return next((ast.unparse(k.value) for k in call.keywords if k.arg == name), None)


def _violations(path: Path, relative: str) -> list[str]:
    """Every way ``path`` could unpickle (or write a pickle), as ``line: problem``; ``relative`` names it in the allow
    list."""
    tree = ast.parse(path.read_text(), filename=str(path))
    problems = []
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        problems += [f"{node.lineno}: imports {n}" for n in names if n.split(".")[0] in UNPICKLERS]
        if isinstance(node, ast.ImportFrom) and node.module == "torch":
            # A bare ``load(...)`` would escape the call checks below, which look for ``torch.load``.
            problems += [f"{node.lineno}: from torch import {a.name}; call torch.{a.name}(...)"
                         for a in node.names if a.name in ("load", "save")]
    for call in _calls(tree, "torch.load"):
        if _keyword(call, "weights_only") != "True":
            problems.append(f"{call.lineno}: torch.load without weights_only=True can unpickle arbitrary objects")
    for call in _calls(tree, "np.load") + _calls(tree, "numpy.load"):
        if _keyword(call, "allow_pickle") not in (None, "False"):
            problems.append(f"{call.lineno}: numpy.load with allow_pickle")
    for call in _calls(tree, "torch.save"):
        target = ast.unparse(call.args[1]) if len(call.args) > 1 else ""
        if not any(relative == where and name in target for where, name in PICKLE_WRITERS_ALLOWED):
            problems.append(f"{call.lineno}: torch.save writes a pickle; save tensors with safetensors")
    return problems


def test_the_check_sees_every_module_of_the_package() -> None:
    names = {p.relative_to(PACKAGE).as_posix() for p in MODULES}
    assert {"core/checkpoint.py", "integrations/hub.py", "integrations/trainer.py", "methods/lora.py"} <= names


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.relative_to(PACKAGE).as_posix())
def test_no_module_can_unpickle(path: Path) -> None:
    assert _violations(path, path.relative_to(PACKAGE).as_posix()) == []


def test_the_check_catches_every_way_in(tmp_path: Path) -> None:
    # The test above passes vacuously if the syntax-tree matching is wrong; these sources must each be caught.
    bad = {
        "aliased.py": "import pickle as p\n",
        "dotted.py": "import _pickle.foo\n",
        "from_import.py": "from dill import loads\n",
        "load.py": "import torch\ntorch.load('x.bin')\n",
        "load_false.py": "import torch\ntorch.load('x.bin', weights_only=False)\n",
        "bare_load.py": "from torch import load\nload('x.bin')\n",
        "numpy.py": "import numpy as np\nnp.load('x.npy', allow_pickle=True)\n",
        "save.py": "import torch\ntorch.save({}, 'adapter_model.bin')\n",
        "save_args_elsewhere.py": "import torch\ntorch.save(args, TRAINING_ARGS_NAME)\n",
    }
    for name, source in bad.items():
        (tmp_path / name).write_text(source)
        assert len(_violations(tmp_path / name, name)) == 1, name
    good = tmp_path / "good.py"
    good.write_text('"""Never unpickles."""\nimport torch\ntorch.load("x.bin", weights_only=True)\n')
    assert _violations(good, "good.py") == []
