"""The few Kubernetes API calls the operator makes (blocking client; kopf runs sync handlers in threads).

Objects are written with server-side apply under one field manager, so applying the same
desired object twice is a no-op and fields other controllers own (HPA replicas, defaults)
are left alone.
"""

from __future__ import annotations

import contextlib
from typing import Any

from kvmesh.services.operator.reconcile import OWNED_KINDS, Obj

FIELD_MANAGER = "kvmesh-operator"


class Cluster:
    """A dynamic client limited to the kinds a pool owns."""

    def __init__(self) -> None:
        from kubernetes import config, dynamic
        from kubernetes.client import ApiClient

        try:
            config.load_incluster_config()
        except config.ConfigException:
            config.load_kube_config()
        self._client = dynamic.DynamicClient(ApiClient())

    def _resource(self, api_version: str, kind: str) -> Any:
        return self._client.resources.get(api_version=api_version, kind=kind)

    def list_owned(self, namespace: str, label_selector: str) -> list[Obj]:
        """Every object of an owned kind in the namespace carrying the pool's label.

        A kind the cluster does not serve (cert-manager not installed) has no objects: a plaintext
        pool (`tls.enabled: false`) runs without cert-manager; a secure one fails to apply its
        Certificates, and kopf retries until cert-manager is there.
        """
        from kubernetes.dynamic.exceptions import ResourceNotFoundError

        out: list[Obj] = []
        for api_version, kind in OWNED_KINDS:
            try:
                resource = self._resource(api_version, kind)
            except ResourceNotFoundError:
                continue
            listing = resource.get(namespace=namespace, label_selector=label_selector)
            for item in listing.to_dict().get("items", []):
                item.setdefault("apiVersion", api_version)
                item.setdefault("kind", kind)
                out.append(item)
        return out

    def apply(self, obj: Obj) -> None:
        resource = self._resource(obj["apiVersion"], obj["kind"])
        self._client.server_side_apply(resource, body=obj, namespace=obj["metadata"]["namespace"],
                                       field_manager=FIELD_MANAGER, force_conflicts=True)

    def delete(self, obj: Obj) -> None:
        from kubernetes.dynamic.exceptions import NotFoundError

        resource = self._resource(obj["apiVersion"], obj["kind"])
        with contextlib.suppress(NotFoundError):  # already gone: the goal is reached
            resource.delete(name=obj["metadata"]["name"], namespace=obj["metadata"]["namespace"],
                            body={"propagationPolicy": "Background"})
