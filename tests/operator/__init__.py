"""The KVCachePool operator: CRD schema, pure reconcile, RBAC."""
