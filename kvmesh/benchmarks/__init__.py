"""``kvmesh bench``: routing quality against peers, microbenchmarks, mesh
convergence and proxy throughput; results in docs/benchmarks.{md,json} and
docs/img/*.png. Each of ``routing``, ``micro``, ``index``, ``convergence`` and
``proxy`` measures one thing (``driver`` and ``echo_server`` serve them);
``targets`` judges the results, ``report`` renders them as markdown and
``plots`` as PNG files."""
