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
# The explicit choice of the benchmarks: python always, native refused clearly.
assert type(native_index.index_of("python", 5)) is PrefixIndex
try:
    native_index.index_of("native")
except RuntimeError as e:
    assert "not built" in str(e)
else:
    raise AssertionError("index_of('native') without the module")
print("ok")
"""


def test_falls_back_to_python_when_not_built() -> None:
    out = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_index_of_names_the_implementation() -> None:
    import pytest

    from router.index import PrefixIndex
    from router.native_index import NativeIndex, index_of

    ix = index_of("python", 7)
    assert type(ix) is PrefixIndex and ix.max_blocks == 7
    if NativeIndex is not None:
        nat = index_of("native", 7)
        assert type(nat) is NativeIndex and nat.max_blocks == 7
    with pytest.raises(ValueError, match="no index implementation"):
        index_of("rust")
