"""Metadata backends: one revisioned-KV interface (`base.Store`), selected by URI (`registry`)."""
