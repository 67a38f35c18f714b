"""kvmesh: a KV-cache-aware LLM request router built as a mesh of stateless gRPC nodes."""

__version__ = "0.1.0"
