"""Kubernetes side of the train step: the training pod (``pod``), job names/labels (``meta``), the PyTorchJob
(``pytorchjob``) and TrainJob + ClusterTrainingRuntime (``trainjob``) renderers, and the launcher that
follows either kind (``kinds``, ``launcher``)."""
