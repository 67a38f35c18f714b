"""A router node: the prefix index, load, routing policies, the request path,
the mesh and adapter shells, and the gRPC service (see router/node.py)."""
