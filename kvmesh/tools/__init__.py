"""The tools layer: the `kvmesh` command, `kvmesh up`, trace replay and the test mesh.

Tools may import the services and the foundation; nothing below imports a tool.
"""
