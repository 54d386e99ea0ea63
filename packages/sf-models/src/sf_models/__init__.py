"""StreamFusion models (placeholder docstring; see cli)."""
