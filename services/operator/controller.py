"""kopf glue: fetch what exists, call the pure reconcile, send the result. No decisions here.

Deletion needs no handler: every owned object carries an ownerReference to its pool and the
garbage collector removes it. (kopf still puts its own finalizer on a pool while the status
timer runs, and removes it when the pool is deleted.)
"""

from __future__ import annotations

import datetime
import functools
import logging
from collections.abc import Mapping
from typing import Any

import kopf

from kvmesh.services.operator.kube import Cluster
from kvmesh.services.operator.reconcile import compute_status, owned_label_selector, plan
from kvmesh.services.operator.spec import GROUP, PLURAL, VERSION

STATUS_REFRESH_SECONDS = 15.0


@functools.cache
def cluster() -> Cluster:
    """One API client per operator process, built on first use (after kopf logged in)."""
    return Cluster()


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    """kopf's bookkeeping goes in annotations: the structural status schema would prune it."""
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=GROUP)
    settings.persistence.finalizer = f"{GROUP}/operator"


def reconcile_pool(body: Mapping[str, Any], patch: kopf.Patch, logger: logging.Logger | kopf.Logger,
                   **_: Any) -> None:
    """On create, on spec change, and for every pool when the operator starts."""
    pool = dict(body)
    namespace = pool["metadata"]["namespace"]
    api = cluster()
    existing = api.list_owned(namespace, owned_label_selector(pool))
    result = plan(pool, existing)
    if result.error is None:
        for obj in result.apply:
            api.apply(obj)
        for obj in result.delete:
            api.delete(obj)
        logger.info(f"applied {len(result.create)} new, {len(result.update)} changed, deleted {len(result.delete)}")
        existing = api.list_owned(namespace, owned_label_selector(pool))
    else:
        logger.error(f"not reconciled: {result.error}")
    patch.status.update(compute_status(pool, existing, _now(), result.error, result.error_reason))


def refresh_status(body: Mapping[str, Any], patch: kopf.Patch, **_: Any) -> None:
    """Children change without the pool changing (pods become ready): keep status current."""
    pool = dict(body)
    existing = cluster().list_owned(pool["metadata"]["namespace"], owned_label_selector(pool))
    result = plan(pool, existing)
    status = compute_status(pool, existing, _now(), result.error, result.error_reason)
    current = dict(body.get("status") or {})
    if any(current.get(k) != v for k, v in status.items()):
        patch.status.update(status)


kopf.on.startup()(configure)
# Registered here rather than by decorators, so the functions keep their plain signatures.
kopf.on.resume(GROUP, VERSION, PLURAL)(reconcile_pool)
kopf.on.create(GROUP, VERSION, PLURAL)(reconcile_pool)
kopf.on.update(GROUP, VERSION, PLURAL)(reconcile_pool)
kopf.timer(GROUP, VERSION, PLURAL, interval=STATUS_REFRESH_SECONDS, initial_delay=STATUS_REFRESH_SECONDS)(
    refresh_status
)
