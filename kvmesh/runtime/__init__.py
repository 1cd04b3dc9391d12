"""The server runtime shared by the three services: gRPC server, health, lifecycle, channels."""
