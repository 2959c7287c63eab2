"""Kiln's own modules run in a child Python (a `kiln bench` worker, a matrix cell): the child imports the very
`kiln` this process runs, whether installed or a checkout run as `python cli.py`, which no child could import by
its name."""

from __future__ import annotations

import sys
from pathlib import Path

# Register the folder as the package `kiln`, then run the module as `python -m` would.
BOOTSTRAP = """import importlib.util, runpy, sys
root, name = sys.argv[1], sys.argv[2]
spec = importlib.util.spec_from_file_location("kiln", root + "/__init__.py", submodule_search_locations=[root])
sys.modules["kiln"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(sys.modules["kiln"])
sys.argv = [name, *sys.argv[3:]]
runpy.run_module(name, run_name="__main__", alter_sys=True)
"""


def module_command(module: str, *args: str) -> list[str]:
    """The command that runs `module` (e.g. "kiln.compiler.matrix.cell") with `args` in a child Python."""
    root = str(Path(__file__).parent.parent)  # the folder of the package `kiln` (compiler/ is in it)
    return [sys.executable, "-c", BOOTSTRAP, root, module, *args]
