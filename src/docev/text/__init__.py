"""Text side of the transform: chat template rendering and loss masks."""
