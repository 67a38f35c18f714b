"""router/native_index.py without the native module: new_index serves the
pure-Python PrefixIndex, and the module imports cleanly (a machine without
Rust runs kvmesh)."""

from __future__ import annotations

import subprocess
import sys

CODE = """
import sys
sys.modules["kvmesh_native"] = None  # as if it was never built
from router import native_index
from router.index import PrefixIndex
assert not native_index.NATIVE_INDEX_BUILT and not native_index.NATIVE_INDEX
assert native_index.NativeIndex is None
ix = native_index.new_index()
assert type(ix) is PrefixIndex
ix.store("e0", [1, 2])
assert ix.match([1, 2, 3]) == {"e0": 2}
print("ok")
"""


def test_falls_back_to_python_when_not_built() -> None:
    out = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
