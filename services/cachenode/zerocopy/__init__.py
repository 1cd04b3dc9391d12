"""The cache node's zero-copy API: Attach/Allocate/Seal/Acquire/ReleaseViews.

Clients that can reach the node's memory directly (shared memory on the same host, or
one-sided RDMA) move bytes themselves; the node only hands out regions to each client's
attachment and keeps the reference counts that make this safe.
"""
