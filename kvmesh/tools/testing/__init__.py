"""The test harness (tools layer, so it may start services in-process).

`mesh.py` brings a whole mesh up in-process or as real `kvmesh` processes, with a hard timeout
and leak checks; `polling.py` is the one way to wait for a condition; `servers.py` starts real
etcd and Redis servers on free loopback ports (`ports.py`). Child processes are
`kvmesh.tools.processes.KvmeshProcess`, the class `kvmesh up` uses too.
"""
