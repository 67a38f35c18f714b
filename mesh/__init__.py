"""Membership, gossip transport and replicated CRDT state of the router mesh.

Knows nothing of prompts or policies."""
