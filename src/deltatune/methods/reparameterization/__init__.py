"""Reparameterization-based delta tuning methods."""
