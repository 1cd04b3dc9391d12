"""The metadata service: membership with leases and watch streams, and a small metadata KV.

Backends (memory://, etcd://, redis://) implement one revisioned-KV interface
(`stores.base.Store`); membership (`directory`) and the gRPC APIs are shared by all.
"""
