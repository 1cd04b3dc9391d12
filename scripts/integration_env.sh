#!/usr/bin/env bash
# Builds the virtualenvs of the real third-party software the integration tests run (vLLM on CPU,
# Envoy, LMCache, aibrix-kvcache, sglang-router): each pins versions the others conflict with, so
# each has its own, under ${KVMESH_VENVS:-.venvs}/NAME (ignored by git, reused between runs).
# kvmesh itself is not installed in them: processes that load kvmesh code (a vLLM connector, a
# storage plugin) get the checkout on PYTHONPATH, plus kvmesh's own dependencies installed here.
#   scripts/integration_env.sh NAME...     (names: requirements/integrations/NAME.txt)
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
venvs=${KVMESH_VENVS:-$root/.venvs}
mkdir -p "$venvs"
PY=${PYTHON:-python3}
for name in "$@"; do
  req=$root/requirements/integrations/$name.txt
  [ -f "$req" ] || { echo "integration_env: no $req" >&2; exit 2; }
  dir=$venvs/$name
  stamp=$dir/.kvmesh-installed
  if [ -f "$stamp" ] && cmp -s "$req" "$stamp"; then
    continue
  fi
  echo "integration_env: building $dir (log: $dir.log)"
  rm -rf "$dir"
  if ! {
    "$PY" -m venv "$dir" &&
    "$dir/bin/python" -m pip install --upgrade pip &&
    # torch first, by itself, so pip takes the CPU wheel on disk rather than a CUDA build.
    { ! grep -q '^torch==' "$req" || "$dir/bin/python" -m pip install "$(grep '^torch==' "$req")"; } &&
    "$dir/bin/python" -m pip install -r "$req" &&
    # kvmesh's runtime dependencies, for code of ours loaded inside the third-party process.
    "$dir/bin/python" -m pip install "grpcio>=1.66" "grpcio-health-checking>=1.66" "protobuf>=5.27" \
      "pydantic>=2.7" "pydantic-settings>=2.3" "numpy>=1.26" "uvloop>=0.19" "redis[hiredis]>=5.0" \
      "opentelemetry-sdk>=1.27" "etcd3gw>=2.4" &&
    if [ -x "$root/requirements/integrations/$name.post" ]; then "$root/requirements/integrations/$name.post" "$dir"; fi
  } >"$dir.log" 2>&1; then
    tail -n 40 "$dir.log" >&2
    echo "integration_env: building $name failed (log: $dir.log)" >&2
    exit 1
  fi
  cp "$req" "$stamp"
done
