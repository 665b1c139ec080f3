"""The recipe's first check: every torch API it uses exists, or the error names the missing ones."""

import pytest

from docev.training import preflight


def test_this_torch_has_every_api_and_a_missing_one_is_named(monkeypatch):
    assert preflight.missing_torch_apis() == []
    preflight.require_torch_apis()
    fake = (("torch.distributed.fsdp", "FSDPModule.set_a_future_knob"), ("torch.no_such_module", "thing"))
    monkeypatch.setattr(preflight, "REQUIRED_APIS", (*preflight.REQUIRED_APIS, *fake))
    with pytest.raises(RuntimeError, match=r"lacks torch\.distributed\.fsdp\.FSDPModule\.set_a_future_knob, "
                                           r"torch\.no_such_module\.thing, .* torch 2\.11 and 2\.13"):  # fmt: skip
        preflight.require_torch_apis()
