"""Whether the central KV-event listener is reachable from other hosts, and the warning if so.

vLLM's publisher speaks plain ZMQ (no TLS, no authentication), and in central mode the ZMQ topic
alone says which pod a batch is about: whoever can connect to `--kv-events-listen` can report
any pod's KV events and steer prompts. The listener is off by default; bound to a loopback or
`ipc://` endpoint only processes on this host reach it. A policy-enforcing router warns loudly
when it is bound anywhere else (docs/security.md, "Router: routes, releases, KV events, the picker").
"""

from __future__ import annotations

import ipaddress
import logging

log = logging.getLogger("kvmesh.router.kv_events")

LOCAL_TRANSPORTS = ("ipc://", "inproc://")


def host_only(endpoint: str) -> bool:
    """The ZMQ endpoint is reachable from this host only: `ipc://`, `inproc://`, or TCP on a
    loopback address (or `localhost`). A wildcard (`*`), an interface name or any other address is not."""
    if endpoint.startswith(LOCAL_TRANSPORTS):
        return True
    transport, sep, rest = endpoint.partition("://")
    if not sep or transport != "tcp":
        return False
    host = rest.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def warn_if_exposed(endpoint: str, policy_enforced: bool) -> bool:
    """Logs an error-level warning when a router with a security policy binds the KV-event
    listener beyond this host; returns whether it warned."""
    if not endpoint or not policy_enforced or host_only(endpoint):
        return False
    log.error(
        "SECURITY: --kv-events-listen %s is reachable from other hosts. vLLM's KV-event publisher "
        "speaks plain ZMQ without TLS or authentication, so anyone who can connect there can report "
        "KV events for ANY pod (the topic names it) and steer where prompts go; the security policy "
        "cannot check them. Bind it to 127.0.0.1 (one router per host with its engines), use the "
        "per-pod mode (engine labels `kv-events`), or restrict the port with a network policy.",
        endpoint,
    )
    return True
