"""``kvmesh bench``: routing quality against peers, microbenchmarks, mesh
convergence, proxy throughput and overload; results in
docs/benchmarks.{md,json} and docs/img/*.png. Each of ``routing``, ``micro``,
``index``, ``convergence``, ``proxy`` and ``overload`` measures one thing
(``driver`` and ``echo_server`` serve them); ``targets`` judges the results,
``report`` renders them as markdown and ``plots`` as PNG files.
``reliability`` causes faults and bad inputs on purpose and writes its own
page, docs/reliability.{md,json} (``reliability_report`` renders it)."""
