"""The C parts of kvmesh's hot paths; everything else is declared in pyproject.toml."""

from setuptools import Extension, setup

FLAGS = ["-O3", "-std=c11", "-Wall", "-Wextra", "-Werror=implicit-function-declaration"]

setup(
    ext_modules=[
        Extension("kvmesh._blocks", ["kvmesh/_blocks.c"], extra_compile_args=FLAGS),
        Extension("kvmesh.services.router._node", ["services/router/_node.c"], extra_compile_args=FLAGS),
        Extension("kvmesh.services.router._shards", ["services/router/_shards.c"], extra_compile_args=FLAGS),
        Extension("kvmesh.services.router.kv_events._decode", ["services/router/kv_events/_decode.c"],
                  extra_compile_args=FLAGS),
    ],
)
