"""A run's on-disk contract, pure pathlib: where every file of a run lives (``paths``), the step-folder rules
of its checkpoints (``checkpoints``) and the one atomic publish (``publish``). Below training, export,
evaluation, the pipeline and k8s; imports nothing of them (and no torch)."""
