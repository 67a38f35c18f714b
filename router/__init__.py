"""Block hashing, the prefix index, load accounting, routing policies and the
gRPC service of a router node."""
