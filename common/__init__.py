"""Registries, retrieval metrics and the code store shared by every layer."""
