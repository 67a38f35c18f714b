"""The deterministic whole-mesh simulation (pure): real ``MeshCore`` nodes and
vLLM-like engines on ``kvmesh.simulation.simnet.SimNet``. Used by the fault simulation
tests (``tests/sim``) and by ``kvmesh bench convergence`` for 10-200 nodes."""
