#!/usr/bin/env bash
# Sets up everything kvmesh needs on a fresh Debian machine: the servers its tests talk to
# (redis-server, etcd-server) and a virtualenv in .venv with pinned Python dependencies.
# Safe to run again: each step is skipped when already done.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v redis-server >/dev/null 2>&1 || need_apt+=(redis-server)
command -v iperf3 >/dev/null 2>&1 || need_apt+=(iperf3)
command -v etcd >/dev/null 2>&1 || need_apt+=(etcd-server)
ldconfig -p 2>/dev/null | grep -q libibverbs.so.1 || need_apt+=(libibverbs1)
# kvmesh's hot paths have C parts (setup.py): a compiler and Python's headers build them.
command -v cc >/dev/null 2>&1 || need_apt+=(gcc libc6-dev)
PY=${PYTHON:-python3}
"$PY" -c 'import os, sysconfig, sys; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' \
  2>/dev/null || need_apt+=(python3-dev)
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "bootstrap: installing ${need_apt[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
    # Debian starts these as system services on install; the tests run their own.
    (systemctl stop redis-server etcd 2>/dev/null || service redis-server stop 2>/dev/null || true) >/dev/null 2>&1
  else
    echo "bootstrap: please install ${need_apt[*]} (needs root and apt-get)" >&2
  fi
fi

if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.kvmesh-installed
# A changed C source (or setup.py) reinstalls too: the editable install builds the extensions in place.
changed_c=""
if [ -f "$stamp" ]; then
  changed_c=$(find setup.py kvmesh/ services/ -newer "$stamp" \( -name '*.c' -o -name setup.py \) | head -n 1)
fi
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ requirements/constraints.txt -nt "$stamp" ] || [ -n "$changed_c" ]; then
  echo "bootstrap: installing Python dependencies into .venv (log: .venv/pip-install.log)"
  # torch: the CPU build is enough for the gpu:// tier's tests (gpu://cpu); CUDA hosts install their own.
  if ! { .venv/bin/python -m pip install --upgrade pip &&
         .venv/bin/python -m pip install -c requirements/constraints.txt -e ".[dev,gpu,rdma,vineyard,k8s]" &&
         # xds-protos (the Envoy ext_proc stubs) bundles an old copy of opentelemetry-proto's
         # modules that overwrites the real ones (no InstrumentationScope: telemetry fails to
         # start); putting opentelemetry-proto's own files back afterwards fixes the clash.
         .venv/bin/python -m pip install -c requirements/constraints.txt --no-deps --force-reinstall \
           opentelemetry-proto; } \
       >.venv/pip-install.log 2>&1; then
    tail -n 60 .venv/pip-install.log >&2
    echo "bootstrap: pip install failed (full log: .venv/pip-install.log)" >&2
    exit 1
  fi
  touch "$stamp"
fi
echo "bootstrap: ready (.venv)"
