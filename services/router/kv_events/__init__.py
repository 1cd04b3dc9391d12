"""vLLM KV events over ZMQ: decoding, per-pod ingestion into the router's tree, subscribers."""
