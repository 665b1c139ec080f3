"""The CRDs in ``src/docev/k8s/schemas`` are the upstream files their README names, byte for byte.

``SHA256SUMS`` beside them records the digests of the upstream files (repository, tag and commit in the README)
taken when they were vendored; a copy edited by hand, truncated or swapped for another version fails here."""

import hashlib
import re

from docev.k8s.admission import CRD, RUNTIME_CRD, SCHEMAS, STOCK_RUNTIME, TRAINJOB_CRD

VENDORED = sorted(str(p.relative_to(SCHEMAS)) for p in SCHEMAS.rglob("*.yaml"))


def _recorded() -> dict[str, str]:
    return {
        name: digest for digest, name in (line.split() for line in (SCHEMAS / "SHA256SUMS").read_text().splitlines())
    }


def test_every_file_the_validators_read_is_vendored_and_documented():
    readme = (SCHEMAS / "README.md").read_text()
    assert {str(p.relative_to(SCHEMAS)) for p in (CRD, TRAINJOB_CRD, RUNTIME_CRD, STOCK_RUNTIME)} == set(VENDORED)
    for rel in VENDORED:
        name = rel.rsplit("/", 1)[-1]
        assert f"`{name}`" in readme or f"## {name}" in readme, rel
    assert len(re.findall(r"commit `[0-9a-f]{40}`", readme)) == 2 and readme.count("Apache License 2.0") == 2


def test_vendored_schemas_match_the_recorded_upstream_digests():
    assert sorted(_recorded()) == VENDORED
    for rel, digest in _recorded().items():
        assert hashlib.sha256((SCHEMAS / rel).read_bytes()).hexdigest() == digest, rel
