"""Run Python in a subprocess where some installed packages cannot be imported, as if they were not installed.

The test venv has numpy, transformers, tokenizers, peft...; a user's `pip install streammerge` has none of them.
A `sitecustomize` placed first on PYTHONPATH makes the path finder pass over the named top-level packages, so an
import raises ModuleNotFoundError and `importlib.util.find_spec` answers None, exactly as for a missing package.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# what the test venv has that a bare install (the package's runtime dependencies) does not
NOT_IN_A_BARE_INSTALL = ("numpy", "transformers", "tokenizers", "peft", "accelerate", "hypothesis", "pytest", "ray")

_SITECUSTOMIZE = '''\
import importlib.machinery
import os

_BLOCKED = frozenset(os.environ["STREAMMERGE_TEST_BLOCKED"].split(","))
_find_spec = importlib.machinery.PathFinder.find_spec


def _find_unless_blocked(cls, name, path=None, target=None):
    if name.partition(".")[0] in _BLOCKED:
        return None  # as if the package were not on sys.path: imports fail, importlib.util.find_spec says None
    return _find_spec(name, path, target)


importlib.machinery.PathFinder.find_spec = classmethod(_find_unless_blocked)
'''


def blocked_env(where: Path, modules: tuple[str, ...] = NOT_IN_A_BARE_INSTALL) -> dict[str, str]:
    """Environment for subprocesses (and their children) in which `modules` cannot be imported."""
    site = Path(where) / "blocked-site"
    site.mkdir(parents=True, exist_ok=True)
    (site / "sitecustomize.py").write_text(_SITECUSTOMIZE)
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(REPO)]),
            "STREAMMERGE_TEST_BLOCKED": ",".join(modules), "STREAMMERGE_DEBUG": ""}


def run_blocked(args: list[str], where: Path, modules: tuple[str, ...] = NOT_IN_A_BARE_INSTALL,
                timeout: float = 300) -> subprocess.CompletedProcess:
    """`python *args` with `modules` unimportable; output captured as text."""
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, cwd=REPO,
                          env=blocked_env(where, modules), timeout=timeout)
