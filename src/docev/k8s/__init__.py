"""Kubernetes side of the train step: PyTorchJob rendering (``pytorchjob``) and the launcher (``launcher``)."""

from docev.k8s.pytorchjob import job_name, render_pytorchjob, to_yaml, training_command, volume_mounts

__all__ = ["job_name", "render_pytorchjob", "to_yaml", "training_command", "volume_mounts"]
