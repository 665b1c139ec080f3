"""Data side of DocEV: UFX records → messages → the model transform (tokens, loss masks, tiles)."""
