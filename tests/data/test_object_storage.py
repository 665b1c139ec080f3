"""validate → preprocess → train with the UFX sources AND output_dir in S3 (moto's server on 127.0.0.1, through
s3fs), against the same data on local disk; a fault-injecting proxy in front of the store; fan-out and reruns
on the store; escapes; secrets."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import s3fs
from conftest import CONFIGS, tiny_config
from s3_server import ACCESS_KEY, CREDENTIAL_ENV, SECRET_KEY, FaultProxy, MotoS3, upload

from docev.data.preprocess import merge_all, run_preprocess, run_shards
from docev.data.shards import ShardError
from docev.outputs import outputs
from docev.sources.fingerprints import SourceChanged
from docev.storage import TransientStorageError
from docev.validate.runner import merge, run_shard, run_validate, validate_dir

BUCKET = "corpus"


@pytest.fixture(scope="module")
def s3(synth_sources):
    saved = {k: os.environ.get(k) for k in CREDENTIAL_ENV}
    os.environ.update(CREDENTIAL_ENV)
    server = MotoS3()
    fs = s3fs.S3FileSystem(endpoint_url=server.endpoint)
    fs.mkdir(BUCKET)
    for name, folder in synth_sources.items():
        upload(fs, folder, f"s3://{BUCKET}/ufx/{name}")
    fs.pipe_file(
        f"{BUCKET}/ufx-private/secret.png", (synth_sources["instruct"] / "images" / "000000_0.png").read_bytes()
    )
    yield server
    server.stop()
    for k, v in saved.items():
        os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


def _datasets(root: str, endpoint: str | None = None, **options) -> list[dict]:
    opts = {"storage_options": {"endpoint_url": endpoint, **options}} if endpoint else {}
    return [
        {"source": f"{root}/instruct", "name": "instruct", "eval_fraction": 0.3, **opts},
        {"source": f"{root}/pretrain", "name": "pretrain", "ufx_type": "pretrain", "context_col": "text", **opts},
    ]


def _in_s3(work: Path, endpoint: str, **options) -> list[str]:
    """Overrides for an output_dir in the store; checkpoints, logs and the node's shard cache stay local."""
    opts = json.dumps({"endpoint_url": endpoint, **options})
    return [f"work_dir={work}", f"dataloader.cache_dir={work / 'node-cache'}", f"output_storage_options={opts}"]


def _run(out: Path | str, ckpt: Path, datasets: list[dict], *overrides: str):
    cfg = tiny_config(out, ckpt, datasets, "preprocess.records_per_shard=6", *overrides)
    report = run_validate(cfg, workers=1)
    return cfg, report, run_preprocess(cfg, workers=1)


def _published(cfg, prefix: str, fs=None) -> dict[str, bytes]:
    """Every file below ``prefix`` of output_dir, read where it is published (the bucket, or the folder)."""
    store = outputs(cfg).store
    fs = fs or store.fs
    return {p.removeprefix(store.root + "/"): fs.cat_file(p) for p in sorted(fs.find(store.join(prefix)))}


def _shard_bytes(cfg, fs=None) -> dict[str, bytes]:
    return {k: v for k, v in _published(cfg, "shards", fs).items() if k.endswith(".arrow")}


def _bucket(s3) -> s3fs.S3FileSystem:
    """A client of its own (no listing cache shared with the store under test), straight to moto."""
    return s3fs.S3FileSystem(endpoint_url=s3.endpoint, skip_instance_cache=True)


@pytest.fixture(scope="module")
def both(tmp_path_factory, tiny_checkpoint, synth_sources, s3):
    local_root = str(synth_sources["instruct"].parent)
    local = _run(tmp_path_factory.mktemp("local"), tiny_checkpoint, _datasets(local_root))
    work = tmp_path_factory.mktemp("s3-work")
    remote = _run(f"s3://{BUCKET}/runs/one", tiny_checkpoint, _datasets(f"s3://{BUCKET}/ufx", s3.endpoint),
                  *_in_s3(work, s3.endpoint))  # fmt: skip
    return local, remote


def _counts(report: dict) -> dict:
    return {n: {k: s[k] for k in ("read", "accepted", "rejected", "reasons")} for n, s in report["sources"].items()}


def test_s3_sources_and_output_dir_give_the_counts_and_shards_of_local_disk(both, s3):
    (lcfg, lrep, lman), (rcfg, rrep, rman) = both
    assert _counts(rrep) == _counts(lrep) and rrep["sources"]["instruct"]["read"] == 20
    assert rcfg.output_dir == f"s3://{BUCKET}/runs/one" and not Path(rcfg.output_dir).exists()
    local = {**_published(lcfg, "validate"), **_published(lcfg, "shards")}
    remote = {**_published(rcfg, "validate", _bucket(s3)), **_published(rcfg, "shards", _bucket(s3))}
    # every output is in the bucket under its name (no temporary object left): parts, manifest, rejects with
    # their reasons, reports, thumbnails, shards + sidecars + manifest + drops of both splits
    assert set(remote) == set(local) and "shards/eval/manifest.json" in remote and "validate/report.html" in remote
    for name in ("validate/manifest.jsonl", "validate/rejects.jsonl", "shards/dropped.jsonl"):
        assert remote[name] == local[name], name
    assert [json.loads(line)["reason"] for line in remote["validate/rejects.jsonl"].splitlines()] == [
        json.loads(line)["reason"] for line in local["validate/rejects.jsonl"].splitlines()
    ]
    assert rman["total_samples"] == lman["total_samples"] and rman["eval_samples"] == lman["eval_samples"] > 0
    assert rman["total_samples"] + rman["eval_samples"] == 25
    assert rman["bytes_original_images"] == lman["bytes_original_images"] > 0
    shards = _shard_bytes(rcfg, _bucket(s3))
    assert len(shards) == len(rman["shards"]) + 1 and shards == _shard_bytes(lcfg)  # byte-identical, train + eval


def test_training_stages_the_shards_from_s3_once_per_node(both, tiny_checkpoint, s3):
    (_, _, lman), (cfg, _, rman) = both
    work = Path(cfg.work_dir)
    args = ["--config", str(CONFIGS / "tiny.yaml"), f"output_dir={cfg.output_dir}",
            f"tokenizer.model_name_or_path={tiny_checkpoint}", "synthetic=null",
            f"datasets={json.dumps(_datasets(f's3://{BUCKET}/ufx', s3.endpoint))}", "epochs=1",
            "epochs=1", "max_steps_per_epoch=2", "save_every_n_steps=100", "preprocess.records_per_shard=6",
            *_in_s3(work, s3.endpoint)]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PET_", "WANDB_"))}
    env.pop("RANK", None)
    done = subprocess.run([sys.executable, "-m", "docev.cli", "train", *args], capture_output=True, text=True,
                          env=env, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    lines = [json.loads(line) for line in (work / "logs" / "metrics.jsonl").open()]
    assert [r["step"] for r in lines if "loss" in r][-1] == 2 and any("eval_loss" in r for r in lines)
    # torchrun ran 2 ranks on this node; each split was staged by one of them, the other waited and reused it
    staged = [line for line in (done.stdout + done.stderr).splitlines() if line.startswith("staged ")]
    assert sorted(line.split(" of ")[1].split(" into ")[0] for line in staged) == [
        f"{cfg.output_dir}/shards",
        f"{cfg.output_dir}/shards/eval",
    ], staged
    caches = sorted((work / "node-cache").glob("shards-*"))
    local = {f"{c.name}/{p.name}": p.read_bytes() for c in caches for p in c.glob("shard-*.arrow")}
    assert len(caches) == 2 and all((c / "manifest.json").is_file() for c in caches)
    assert len(local) == len(rman["shards"]) + 1 and not list((work / "node-cache").rglob(".*.tmp"))
    assert sorted(local.values()) == sorted(_shard_bytes(cfg, _bucket(s3)).values())


def test_no_credential_in_any_output_file_or_the_compiled_pipeline(both, tmp_path, s3):
    from pipelines.compile import compile_pipeline

    _, (cfg, _, _) = both
    datasets = _datasets(f"s3://{BUCKET}/ufx", "http://minio.storage:9000")
    out = compile_pipeline(
        CONFIGS / "docev_preview.yaml",
        tmp_path / "p.yaml",
        [f"datasets={json.dumps(datasets)}", "kubernetes.storage_secret=docev-s3", "output_dir=s3://corpus/runs/p",
         "work_dir=/mnt/docev/runs/p", "dataloader.cache_dir=/local/nvme/docev-cache",
         'output_storage_options={"endpoint_url": "http://minio.storage:9000"}'],
    )  # fmt: skip
    text = out.read_text()
    assert "docev-s3" in text and "AWS_SECRET_ACCESS_KEY" in text  # referenced by name, as env
    assert "s3://corpus/runs/p" in text  # the object-store output_dir compiles
    files = {str(p): p.read_bytes() for p in Path(cfg.work_dir).rglob("*") if p.is_file()}
    files[str(out)] = out.read_bytes()
    bucket = _bucket(s3)
    files |= {f"s3://{p}": bucket.cat_file(p) for p in bucket.find(BUCKET)}  # sources, every run's outputs
    assert len(files) > 40 and any("/runs/one/shards/" in name for name in files)
    for name, blob in files.items():
        assert ACCESS_KEY.encode() not in blob and SECRET_KEY.encode() not in blob, name


def test_faults_are_retried_counted_and_lose_nothing(both, tmp_path, tiny_checkpoint, s3):
    _, (rcfg, rrep, rman) = both
    proxy = FaultProxy(s3.endpoint, every=3)
    try:  # sources and output_dir behind the proxy
        datasets = _datasets(f"s3://{BUCKET}/ufx", proxy.endpoint, backoff_seconds=0.01)
        cfg = tiny_config(f"s3://{BUCKET}/runs/faulty", tiny_checkpoint, datasets, "preprocess.records_per_shard=6",
                          *_in_s3(tmp_path, proxy.endpoint, backoff_seconds=0.01))  # fmt: skip
        report = run_validate(cfg, workers=1)
        validate_faults = dict(proxy.faults)
        manifest = run_preprocess(cfg, workers=1)
    finally:
        proxy.stop()
    assert validate_faults["503"] > 3 and validate_faults["drop"] > 3
    # the report counts the retries of the record reads (listing, thumbnails and output reads retry too, uncounted;
    # a dropped keep-alive connection may also be re-sent by aiohttp itself): some, never more than the faults
    retries = sum(s["retries"] for s in report["sources"].values())
    assert 0 < retries <= sum(validate_faults.values())
    assert 0 < manifest["storage_retries"] <= sum(proxy.faults.values()) - sum(validate_faults.values())
    assert _counts(report) == _counts(rrep) and manifest["total_samples"] == rman["total_samples"]
    bucket = _bucket(s3)
    got, want = _published(cfg, "validate", bucket), _published(rcfg, "validate", bucket)
    assert set(got) == set(want) and got["validate/manifest.jsonl"] == want["validate/manifest.jsonl"]
    assert got["validate/rejects.jsonl"] == want["validate/rejects.jsonl"]
    assert _shard_bytes(cfg, bucket) == _shard_bytes(rcfg, bucket)
    md = got["validate/report.md"].decode()
    assert all(f"- {n}: retries {s['retries']}" in md for n, s in report["sources"].items())


def test_fan_out_and_reruns_on_the_store(both, tmp_path, tiny_checkpoint, s3):
    _, (rcfg, _, rman) = both
    assert len(rman["shards"]) == 4
    datasets = _datasets(f"s3://{BUCKET}/ufx", s3.endpoint)
    cfg = tiny_config(f"s3://{BUCKET}/runs/fanout", tiny_checkpoint, datasets, "preprocess.records_per_shard=6",
                      *_in_s3(tmp_path, s3.endpoint))  # fmt: skip
    bucket, run = _bucket(s3), f"{BUCKET}/runs/fanout"
    for i in (1, 0):  # two KFP tasks, in any order, then the merge
        run_shard(cfg, i, 2)
    merge(cfg, 2)
    want = _published(rcfg, "validate", bucket)
    assert _published(cfg, "validate/manifest.jsonl", bucket) == {
        "validate/manifest.jsonl": want["validate/manifest.jsonl"]
    }
    assert run_shards(cfg, 0, 2) == [0, 2]
    with pytest.raises(
        ShardError, match=r"2 of 4 shards missing or corrupt in s3://corpus/runs/fanout/shards: \[1, 3\]"
    ):
        merge_all(cfg)
    assert not bucket.exists(f"{run}/shards/manifest.json")  # never a manifest naming a missing shard
    assert run_shards(cfg, 1, 2) == [1, 3] and run_shards(cfg, 0, 2) == []  # a rerun finds its shards done
    assert run_shards(cfg, 0, 1, split="eval") == [0]
    bucket.rm_file(f"{run}/shards/shard-00002.arrow")
    bucket.pipe_file(f"{run}/shards/shard-00000.arrow", b"truncated")  # a corrupt object is rebuilt too
    assert run_shards(cfg, 0, 2) == [0, 2]
    manifest = merge_all(cfg)
    assert [s["file"] for s in manifest["shards"]] == [f"shard-{k:05d}.arrow" for k in range(4)]
    assert _shard_bytes(cfg, bucket) == _shard_bytes(rcfg, bucket)
    assert not [p for p in bucket.find(run) if ".tmp-" in p]


def test_a_fault_that_outlasts_the_retries_fails_the_task(tmp_path, tiny_checkpoint, s3):
    proxy = FaultProxy(s3.endpoint, every=1)  # every GET fails
    try:
        datasets = _datasets(f"s3://{BUCKET}/ufx", proxy.endpoint, backoff_seconds=0.0, retries=2)
        cfg = tiny_config(tmp_path, tiny_checkpoint, datasets)
        with pytest.raises(TransientStorageError, match="still failing after 2 retries"):
            run_validate(cfg, workers=1)
    finally:
        proxy.stop()
    assert not (validate_dir(cfg) / "rejects.jsonl").exists()  # never turned into rejects


def test_images_escaping_the_source_prefix_are_rejected_with_the_reason(tmp_path, tiny_checkpoint, s3):
    fs = s3fs.S3FileSystem(endpoint_url=s3.endpoint)
    record = {"context": [{"role": "user", "content": "<image> What?"}, {"role": "assistant", "content": "A."}]}
    names = ["../../ufx-private/secret.png", "s3://corpus/ufx-private/secret.png", "s3://other/x.png",
             "images/nowhere.png"]  # fmt: skip
    lines = [json.dumps({"id": f"r{i}", **record, "image_files": [n]}) for i, n in enumerate(names)]
    fs.pipe_file(f"{BUCKET}/esc/src/data.jsonl", ("\n".join(lines) + "\n").encode())
    datasets = [{"source": f"s3://{BUCKET}/esc/src", "name": "esc", "storage_options": {"endpoint_url": s3.endpoint}}]
    cfg = tiny_config(f"s3://{BUCKET}/runs/esc", tiny_checkpoint, datasets, "validate.max_reject_fraction=1.0",
                      *_in_s3(tmp_path, s3.endpoint))  # fmt: skip
    run_validate(cfg, workers=1)
    published = _published(cfg, "validate", _bucket(s3))["validate/rejects.jsonl"]  # in the bucket, with reasons
    rejects = [json.loads(line) for line in published.splitlines()]
    assert [r["reason"] for r in rejects] == ["path_escape"] * 3 + ["image_missing"]
    assert "s3://corpus/ufx-private/secret.png, outside the source root s3://corpus/esc/src" in rejects[0]["detail"]
    assert "outside the allowed roots" in rejects[1]["detail"] and rejects[1]["field"] == "image_files.0"
    # the other prefix becomes readable once it is an allowed root
    allowed = tiny_config(tmp_path / "allowed", tiny_checkpoint, datasets, "validate.max_reject_fraction=1.0",
                          'validate.allowed_roots=["s3://corpus/ufx-private"]')  # fmt: skip
    run_validate(allowed, workers=1)
    rejects = [json.loads(line)["reason"] for line in (validate_dir(allowed) / "rejects.jsonl").open()]
    assert rejects == ["path_escape", "image_missing"]


def test_export_smoke_image_is_read_from_the_source_store(both):
    from docev.export.export import _smoke_image, pick_smoke_sample

    (lcfg, _, _), (rcfg, _, _) = both
    local, remote = pick_smoke_sample(lcfg), pick_smoke_sample(rcfg)
    assert str(remote.image).startswith(f"s3://{BUCKET}/ufx/") and remote.id == local.id
    assert _smoke_image(rcfg, remote).tobytes() == _smoke_image(lcfg, local).tobytes()


def test_preprocess_refuses_an_object_changed_since_validate(tmp_path, tiny_checkpoint, synth_sources, s3):
    """A record edited in place (the object rewritten: a new ETag), then a page image replaced by another page:
    preprocess refuses naming the s3:// object; the original bytes put back are accepted."""
    fs = _bucket(s3)
    upload(fs, synth_sources["instruct"], f"s3://{BUCKET}/changing/instruct")
    datasets = [{"source": f"s3://{BUCKET}/changing/instruct", "name": "instruct",
                 "storage_options": {"endpoint_url": s3.endpoint}}]  # fmt: skip
    cfg = tiny_config(tmp_path / "run", tiny_checkpoint, datasets, "preprocess.records_per_shard=100")
    run_validate(cfg, workers=1)
    other_page = fs.cat_file(f"{BUCKET}/changing/instruct/images/000002_0.jpg")
    edits = {"data.jsonl": lambda b: b.replace(b'"content": "form"', b'"content": "fork"', 1),
             "images/000000_0.png": lambda b: other_page}  # fmt: skip
    for name, change in edits.items():
        key = f"{BUCKET}/changing/instruct/{name}"
        original = fs.cat_file(key)
        fs.pipe_file(key, change(original))
        with pytest.raises(SourceChanged, match=f"source changed since validate: s3://{key}.* — run validate again"):
            run_shards(cfg, workers=1)
        fs.pipe_file(key, original)
    assert run_shards(cfg, workers=1) == [0]
