"""enginesim service."""
