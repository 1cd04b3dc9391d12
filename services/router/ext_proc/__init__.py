"""The router as an Envoy `ext_proc` endpoint picker (Gateway API Inference Extension protocol)."""
