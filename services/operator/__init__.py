"""operator service."""
