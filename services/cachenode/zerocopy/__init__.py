"""The cache node's data-path sessions: Attach/Allocate/Seal/Acquire/ReleaseViews.

Clients that can reach the node's memory directly (shared memory on the same host, or
one-sided RDMA) move bytes themselves; the node only hands out regions and keeps the
reference counts that make this safe.
"""
