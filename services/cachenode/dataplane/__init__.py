"""The cache node's bulk data plane: binary frames on persistent TCP connections (kvmesh.frames)."""
