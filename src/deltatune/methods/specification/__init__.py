"""Specification-based delta tuning methods."""
