"""engine_adapters/native.py's choice: native where built, the Python path
when forced (KVMESH_PURE_PYTHON=1) or when the module is missing; both give
kvmesh's types. Runs whether or not the native module is built."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from blocks.delta import OP_STORE
from engine_adapters import native
from engine_adapters.block_mapper import BlockMapper
from engine_adapters.kv_events import BlockStored, KVEventBatch, encode_batch

ROOT = Path(__file__).resolve().parents[2]
PAYLOAD = encode_batch(KVEventBatch(2.5, [BlockStored([7, 8], None, list(range(8)), 4)], 1))

# Run in a fresh interpreter: the choice is made at import.
PROBE = """
import sys
if sys.argv[1] == "hide":
    sys.modules["kvmesh_native"] = None  # as if it was never built
from engine_adapters import native
from engine_adapters.kv_events import BlockStored, KVEventBatch, encode_batch
m = native.new_mapper("m", "w", 4)
payload = encode_batch(KVEventBatch(2.5, [BlockStored([7, 8], None, list(range(8)), 4)], 1))
frame, delta = native.map_frame(m, payload, 3)
batch = native.decode_batch(payload)
print(native.IMPLEMENTATION, native.NATIVE_BUILT, type(m).__name__, frame.rank, len(delta.ops[0].hashes),
      len(batch.events))
"""


def _probe(hide: bool, pure: str) -> list[str]:
    env = {**os.environ, "KVMESH_PURE_PYTHON": pure}
    out = subprocess.run(
        [sys.executable, "-c", PROBE, "hide" if hide else "keep"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


def test_without_the_module_the_python_path_serves() -> None:
    assert _probe(hide=True, pure="") == ["python", "False", "BlockMapper", "1", "2", "1"]


def test_pure_python_is_forced_by_the_environment() -> None:
    built = str(native.NATIVE_BUILT)
    assert _probe(hide=False, pure="1") == ["python", built, "BlockMapper", "1", "2", "1"]
    if native.NATIVE_BUILT:
        assert _probe(hide=False, pure="") == ["native", "True", "NativeBlockMapper", "1", "2", "1"]


def test_map_frame_with_a_python_mapper_is_decode_then_map() -> None:
    frame, delta = native.map_frame(BlockMapper("m", "w", 4), PAYLOAD, 3)
    assert frame == native.Frame(2.5, 1, 1)
    assert [op.kind for op in delta.ops] == [OP_STORE] and delta.ops[0].ehashes == [7, 8]
    assert delta.seq == 3 and delta.worker == "w"
