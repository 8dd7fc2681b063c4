"""The ``loratools`` command line: a thin Click layer over the library.

Each command lives in its own ``*_cmd.py`` module, imported here to register it on the group.
Commands only parse options, show progress and render the plain data the library returns
(tabulate tables, ``--json``, ``--plot``).
"""

from __future__ import annotations

import importlib
import pkgutil

from loratools.cli.common import main

for _mod in sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name.endswith("_cmd")):
    importlib.import_module(f"{__name__}.{_mod}")

__all__ = ["main"]
