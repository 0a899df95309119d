"""Benchmarks: each is ``python3 -m benchmarks.NAME`` from the repository root.

They measure this tree's code, whatever an earlier ``pip install -e`` of another checkout points at: its
``module/`` goes first on the path, for this process and the ``leafguard`` processes it starts.
"""

import os
import sys
from pathlib import Path

_MODULE = str(Path(__file__).resolve().parent.parent / "module")
if sys.path[:1] != [_MODULE]:
    sys.path.insert(0, _MODULE)
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [_MODULE, os.environ.get("PYTHONPATH")]))
