"""Tier 2: sf_models adapters against the single-process diffusers models."""
