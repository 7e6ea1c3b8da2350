"""Addition-based delta tuning methods."""
