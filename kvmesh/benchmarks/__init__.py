"""``kvmesh bench``: routing quality against peers, microbenchmarks, mesh
convergence and proxy throughput; results in docs/benchmarks.{md,json} and
docs/img/*.png. Each module measures one thing; ``report`` renders them."""
