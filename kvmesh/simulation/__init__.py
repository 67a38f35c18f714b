"""The deterministic whole-mesh simulation (pure): real ``MeshCore`` nodes and
modelled vLLM-like engines (``engine_model.ModelledEngine``) on
``simnet.SimNet``'s virtual network. Used by the fault simulation tests
(``tests/sim``) and by ``kvmesh bench convergence`` for 10-200 nodes."""
