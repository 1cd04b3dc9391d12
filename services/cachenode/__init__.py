"""cachenode service."""
