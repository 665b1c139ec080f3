"""Component signatures read from source (no import) equal inspect's; what source cannot settle is imported."""

import importlib
import inspect
import sys
from decimal import Decimal

import pytest

from docev.config import components
from docev.config.jobs import _positive_quantity


def _inspected(path: str) -> components.Params:
    module, _, attr = path.rpartition(".")
    params = inspect.signature(getattr(importlib.import_module(module), attr)).parameters.values()
    return components.Params({p.name: p.default for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)},
                             any(p.kind is p.VAR_KEYWORD for p in params))  # fmt: skip


@pytest.mark.parametrize(
    "path",
    [
        "torch.optim.AdamW",  # re-exported by torch/optim/__init__.py from torch.optim.adamw
        "torch.optim.lr_scheduler.CosineAnnealingLR",
        "torchtune.training.lr_schedulers.get_cosine_schedule_with_warmup",
        "torchtune.modules.loss.CEWithChunkedOutputLoss",  # relative re-export
        "torchtune.training.metric_logging.DiskLogger",  # **kwargs
        "torchtune.training.metric_logging.WandBLogger",
    ],
)
def test_signature_from_source_equals_inspect(path):
    module, _, attr = path.rpartition(".")
    assert components._static(module, attr, components._MAX_HOPS) == _inspected(path)


def test_names_made_at_run_time_are_imported(tmp_path, monkeypatch):
    pkg = tmp_path / "docev_probe_pkg"
    pkg.mkdir()
    (pkg / "impl.py").write_text("def fn(x, y=2, *args, z=True, w=len, **kw):\n    pass\n")
    (pkg / "__init__.py").write_text(
        "from .impl import fn\n"
        "try:\n    from .fast import Cls\nexcept ImportError:\n"
        "    class Cls:\n        def __init__(self, a=1):\n            pass\n"
        "alias = fn\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    static = components._static("docev_probe_pkg", "fn", components._MAX_HOPS)
    assert static == components.Params({"x": inspect.Parameter.empty, "y": 2, "z": True, "w": components.UNKNOWN}, True)
    assert "docev_probe_pkg" not in sys.modules  # read, not imported
    assert components._static("docev_probe_pkg", "Cls", components._MAX_HOPS) is None  # bound under try
    assert components._static("docev_probe_pkg", "alias", components._MAX_HOPS) is None  # an assignment
    assert components.component_params("docev_probe_pkg.Cls") == components.Params({"a": 1}, False)  # imported
    assert "docev_probe_pkg" in sys.modules
    with pytest.raises(AttributeError):
        components.component_params("docev_probe_pkg.missing")
    monkeypatch.delitem(sys.modules, "docev_probe_pkg")
    monkeypatch.delitem(sys.modules, "docev_probe_pkg.impl")


@pytest.mark.parametrize("text", ["8", "500m", "64Gi", "1.5", ".5", "2e3", "1E-2", "100Ki", "3T", "250u", "+4"])
def test_quantities_kubernetes_accepts(text):
    from kubernetes.utils import parse_quantity  # the independent reading: the kubernetes client's parser

    assert parse_quantity(text) > Decimal(0)
    assert _positive_quantity(text) == text


@pytest.mark.parametrize("text", ["64GB", "1ki", "Gi", "1 Gi", "1.2.3", "", "1Mii", "0x10", "1_000", "Infinity"])
def test_quantities_kubernetes_rejects(text):
    with pytest.raises(ValueError, match="not a Kubernetes quantity"):
        _positive_quantity(text)


@pytest.mark.parametrize("text", ["0", "-1", "0Gi", "-500m"])
def test_quantities_must_be_positive(text):
    with pytest.raises(ValueError, match="must be positive"):
        _positive_quantity(text)
