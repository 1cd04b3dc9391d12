"""metadata service."""
