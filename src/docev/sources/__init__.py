"""The UFX-source layer: reading records and images from a dataset source (``readers``) and the validated
manifest of accepted records (``manifest``). Below ``data`` and ``validate``, which both read sources."""
