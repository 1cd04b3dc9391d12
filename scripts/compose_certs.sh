#!/usr/bin/env bash
# The development CA of the compose mesh, and one certificate per compose service, made with
# `kvmesh certs` (docs/security.md, "Secure by default"). Not a production PKI: use cert-manager
# (deploy/k8s) or your own CA there.
#
#   scripts/compose_certs.sh [DIR]        # default: deploy/compose/certs (git-ignored)
#
# Layout: DIR/ca.pem and DIR/ca-key.pem (the CA; never mounted), and DIR/<service>/ holding
# <service>.pem, <service>-key.pem and ca.pem. Compose mounts each service's own folder read-only at
# /certs, so a container sees its key and nobody else's. DIR/ops/ is a person's admin certificate
# (`kvmesh members`, `kvmesh route` from the host: KVMESH_TLS_CA/CERT/KEY), mounted nowhere. A certificate names its service (subject
# CN = the identity deploy/compose/policy/policy.yaml grants to) and is valid for the compose host
# name, localhost and 127.0.0.1 (the health probe dials loopback). Re-running keeps the CA and
# reissues every certificate: files are replaced atomically in the mounted folders, a rotation the
# running services pick up without a restart (Envoy reads its files at start: restart `gateway`).
#
# The containers run as other users than you (kvmesh: uid 10001, Envoy: uid 101): as root the keys
# are handed to those users; otherwise they are made readable to all on this machine (a development
# CA on a workstation only).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
dir="${1:-$here/../deploy/compose/certs}"
kvmesh="${KVMESH:-kvmesh}"
kvmesh_uid="${KVMESH_CONTAINER_UID:-10001}"
envoy_uid="${ENVOY_CONTAINER_UID:-101}"

"$kvmesh" certs init --dir "$dir" >/dev/null
services=(metadata-1 metadata-2 cachenode-1 cachenode-2 cachenode-3 router enginesim-1 enginesim-2 bench gateway ops)
for name in "${services[@]}"; do
  out="$dir/$name"
  mkdir -p "$out"
  "$kvmesh" certs issue --dir "$dir" --out "$out" "$name" --host "$name" --host localhost --host 127.0.0.1 \
    --days 30 >/dev/null
  cp "$dir/ca.pem" "$out/.ca.pem.tmp" && mv -f "$out/.ca.pem.tmp" "$out/ca.pem"
  uid="$kvmesh_uid"
  [ "$name" = gateway ] && uid="$envoy_uid"
  [ "$name" = ops ] && continue  # stays yours
  if [ "$(id -u)" = 0 ]; then
    chown -R "$uid" "$out"
  else
    chmod a+r "$out/$name-key.pem"
  fi
done
echo "compose certificates in $dir (CA $dir/ca.pem); docker compose mounts $dir/<service> at /certs"
