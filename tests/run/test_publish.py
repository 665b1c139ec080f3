"""The one atomic publish: a reader sees the old content or the new, never a torn file; fsyncs reach disk."""

import os

import pytest

from docev.run import publish as pub


def test_file_appears_whole_or_not_at_all(tmp_path):
    final = tmp_path / "manifest.json"
    final.write_text("old")
    with pytest.raises(RuntimeError), pub.publishing(final) as fh:
        fh.write("half of the new")
        raise RuntimeError("killed mid-write")
    assert final.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json"]
    pub.write_text(final, "new")
    assert final.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json"]


def test_publish_fsyncs_the_file_then_the_folder(tmp_path, monkeypatch):
    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(os.readlink(f"/proc/self/fd/{fd}")) or real(fd))
    pub.write_bytes(tmp_path / "a.bin", b"x")
    assert synced == [str(tmp_path / ".a.bin.tmp"), str(tmp_path)]


def test_folder_replaces_an_old_one_and_puts_it_back_when_the_rename_fails(tmp_path, monkeypatch):
    final = tmp_path / "step_4"
    final.mkdir()
    (final / "w").write_text("old")
    tmp = pub.temp_folder(final)
    (tmp / "w").write_text("new")
    real = os.replace

    def fail_second(src, dst):
        if str(src) == str(tmp):
            raise OSError("disk full")
        real(src, dst)

    monkeypatch.setattr(pub, "_renameat2", None)  # a filesystem without renameat2's exchange (NFS): rename aside
    monkeypatch.setattr(os, "replace", fail_second)
    with pytest.raises(OSError, match="disk full"):
        pub.publish(tmp, final)
    assert (final / "w").read_text() == "old"
    monkeypatch.setattr(os, "replace", real)
    pub.publish(tmp, final)
    assert (final / "w").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["step_4"]


def test_folder_is_exchanged_in_one_step_where_the_filesystem_can(tmp_path, monkeypatch):
    if pub._renameat2 is None:
        pytest.skip("libc has no renameat2: the exchange did not run")
    final = tmp_path / "export"
    final.mkdir()
    (final / "w").write_text("old")
    tmp = pub.temp_folder(final)
    (tmp / "w").write_text("new")
    monkeypatch.setattr(os, "replace", lambda *a: pytest.fail(f"renamed {a} instead of exchanging"))
    removed = []
    pub.publish(tmp, final, remove_old=lambda old: removed.append((old, (old / "w").read_text())))
    assert (final / "w").read_text() == "new" and removed == [(tmp, "old")]  # the old folder, whole, at tmp
