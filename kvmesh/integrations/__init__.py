"""Plug-ins that let third-party inference software use kvmesh through its own configuration:
a vLLM KV connector, an LMCache remote storage plugin, an AIBrix KV-cache L2 backend.

They sit beside the services, above the client library: they use the mesh only as a client does,
never a service's internals. Each imports its third-party package lazily, so `import kvmesh`
never needs vLLM, LMCache or aibrix-kvcache.
"""
