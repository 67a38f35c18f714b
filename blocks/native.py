"""The one switch between the native hot path and the pure-Python reference.

``KVMESH_PURE_PYTHON=1`` in the environment makes every dispatch point
(``engine_adapters.native``, ``router.native_index``,
``mesh.engine_log.packed``) take the Python path although the native module
(``native/``, ``kvmesh_native``) is built. Each reads it once, at import.
"""

from __future__ import annotations

import os

__all__ = ["ENV_PURE_PYTHON", "pure_python_forced"]

ENV_PURE_PYTHON = "KVMESH_PURE_PYTHON"


def pure_python_forced() -> bool:
    """Whether the environment forces the pure-Python path."""
    return os.environ.get(ENV_PURE_PYTHON, "") == "1"
