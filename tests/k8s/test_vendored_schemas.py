"""The CRDs in ``src/docev/k8s/schemas`` are the upstream files their README names, byte for byte.

The team keeps the upstream copies in ``../shared/schemas`` beside the repository; this is the only place the
project looks there, and the comparison is skipped on a clone that stands alone (everything else reads the
vendored copies)."""

import re
from pathlib import Path

import pytest

from docev.k8s.admission import CRD, RUNTIME_CRD, SCHEMAS, STOCK_RUNTIME, TRAINJOB_CRD

REPO = Path(__file__).resolve().parents[2]
UPSTREAM = REPO.parent / "shared" / "schemas"
VENDORED = sorted(p.relative_to(SCHEMAS) for p in SCHEMAS.rglob("*.yaml"))


def test_every_file_the_validators_read_is_vendored_and_documented():
    readme = (SCHEMAS / "README.md").read_text()
    assert {p.relative_to(SCHEMAS) for p in (CRD, TRAINJOB_CRD, RUNTIME_CRD, STOCK_RUNTIME)} == set(VENDORED)
    for rel in VENDORED:
        assert f"`{rel.name}`" in readme or f"## {rel.name}" in readme, rel
    assert len(re.findall(r"commit `[0-9a-f]{40}`", readme)) == 2 and readme.count("Apache License 2.0") == 2


@pytest.mark.skipif(not UPSTREAM.is_dir(), reason="no ../shared/schemas beside this clone")
@pytest.mark.parametrize("rel", VENDORED, ids=str)
def test_vendored_schema_equals_upstream(rel):
    assert (SCHEMAS / rel).read_bytes() == (UPSTREAM / rel).read_bytes()
