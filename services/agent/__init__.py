"""`kvmesh agent`: the sidecar that brings a vLLM pod into the mesh as an engine member."""
