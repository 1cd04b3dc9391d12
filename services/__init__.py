"""The services layer, imported as `kvmesh.services` (this folder is linked there).

metadata, cachenode, router, enginesim and operator: each imports only the foundation
(`kvmesh.*` outside `kvmesh.services` and `kvmesh.tools`), never another service.
"""

if __name__ != "kvmesh.services":  # one import name per module: never `import services...`
    raise ImportError(f"import kvmesh.services, not {__name__} (the folder is linked into the kvmesh package)")
