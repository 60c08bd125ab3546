"""Channel loss: per-source loss curves that add up exactly to the global loss."""
