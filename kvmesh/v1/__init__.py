"""Generated gRPC stubs for the kvmesh.v1 proto package (`make protos`)."""
