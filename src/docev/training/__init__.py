"""Training: the distributed fine-tuning recipe, its checkpoint bookkeeping and metrics."""
