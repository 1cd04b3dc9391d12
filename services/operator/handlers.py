"""kopf glue: fetch what exists, call the pure reconcile, send the result. No decisions here.

Deletion needs no handler (and so no finalizer): every owned object carries an
ownerReference to its pool and the garbage collector removes it.
"""

from __future__ import annotations

import datetime
import functools
from typing import Any

import kopf

from services.operator.kube import Cluster
from services.operator.reconcile import compute_status, owned_label_selector, plan
from services.operator.spec import GROUP, PLURAL, VERSION

STATUS_REFRESH_SECONDS = 15.0


@functools.cache
def cluster() -> Cluster:
    """One API client per operator process, built on first use (after kopf logged in)."""
    return Cluster()


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@kopf.on.resume(GROUP, VERSION, PLURAL)
@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL)
def reconcile_pool(body: kopf.Body, patch: kopf.Patch, logger: kopf.Logger, **_: Any) -> None:
    pool = dict(body)
    api = cluster()
    existing = api.list_owned(body.metadata.namespace or "", owned_label_selector(pool))
    result = plan(pool, existing)
    if result.error is None:
        for obj in result.apply:
            api.apply(obj)
        for obj in result.delete:
            api.delete(obj)
        logger.info(f"applied {len(result.create)} new, {len(result.update)} changed, deleted {len(result.delete)}")
        existing = api.list_owned(body.metadata.namespace or "", owned_label_selector(pool))
    else:
        logger.error(f"not reconciled: {result.error}")
    patch.status.update(compute_status(pool, existing, _now(), result.error, result.error_reason))


@kopf.timer(GROUP, VERSION, PLURAL, interval=STATUS_REFRESH_SECONDS, initial_delay=STATUS_REFRESH_SECONDS)
def refresh_status(body: kopf.Body, patch: kopf.Patch, **_: Any) -> None:
    """Children change without the pool changing (pods become ready): keep status current."""
    pool = dict(body)
    existing = cluster().list_owned(body.metadata.namespace or "", owned_label_selector(pool))
    result = plan(pool, existing)
    status = compute_status(pool, existing, _now(), result.error, result.error_reason)
    current = dict(body.get("status") or {})
    if any(current.get(k) != v for k, v in status.items()):
        patch.status.update(status)
