"""Deployment artefacts: image health probe, compose file, Kubernetes manifests."""
