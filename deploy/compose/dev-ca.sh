#!/usr/bin/env bash
# A development CA and one certificate per compose service, for running the compose mesh with
# mutual TLS (docs/security.md). Not a production PKI: use cert-manager or your own CA there.
#
#   deploy/compose/dev-ca.sh [DIR]        # default: deploy/compose/certs (git-ignored)
#
# Each service's certificate names it (subject CN = its identity, e.g. cachenode-1) and is valid
# for its compose host name, localhost and 127.0.0.1. Re-running keeps the CA and reissues the
# services' certificates: a rotation the running services pick up without a restart.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
dir="${1:-$here/certs}"
kvmesh="${KVMESH:-kvmesh}"

"$kvmesh" certs init --dir "$dir"
for name in metadata-1 metadata-2 metadata-redis-1 metadata-redis-2 cachenode-1 cachenode-2 cachenode-3 \
            router enginesim-1 enginesim-2 bench; do
  "$kvmesh" certs issue --dir "$dir" "$name" --host "$name" --host localhost --host 127.0.0.1 --days 30
done
echo "certificates in $dir; mount it read-only and set KVMESH_TLS_CERT=/certs/<service>.pem," \
     "KVMESH_TLS_KEY=/certs/<service>-key.pem, KVMESH_TLS_CA=/certs/ca.pem"
