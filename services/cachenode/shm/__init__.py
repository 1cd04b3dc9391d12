"""Shared-memory segments that co-located clients map to read and write values in place."""
