"""Optional integrations with other libraries; each module guards its own import."""
