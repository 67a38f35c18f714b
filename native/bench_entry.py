"""Non-owner apply of replicated log entries, native vs Python, on the same entries.

    .venv/bin/python native/bench_entry.py [--blocks 1000000] [--engines 1000] [--json]

A thin front of ``kvmesh/benchmarks/nonowner.py`` (``bench_non_owner``, where
the paths and the stream are described): Python decode + ``PrefixIndex``,
Python decode + ``NativeIndex``, native ``decode_entry`` +
``NativeIndex.apply_packed``, and the same end to end through
``MeshState.apply_remote`` of an owner's real pycrdt updates. Blocks per
second of CPU time, one run each, every index checked equal.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kvmesh.benchmarks.nonowner import main  # after the path is set

if __name__ == "__main__":
    main()
