"""kvmesh services: metadata, cachenode, router, enginesim, operator."""
