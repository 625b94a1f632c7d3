"""megarnn/files.py: the one atomic writer (files and directories, nothing half-written left behind)."""
import pytest

from megarnn.files import atomic_path, atomic_write, temp_path


def test_atomic_write_replaces_whole_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "sub" / "latest"
    atomic_write(target, "step_000002")
    atomic_write(target, b"step_000004")
    assert target.read_text() == "step_000004"
    assert sorted(p.name for p in target.parent.iterdir()) == ["latest"]


def test_failed_write_keeps_the_old_file_and_removes_the_temporary(tmp_path):
    target = tmp_path / "megarnn.json"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("disk full")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["megarnn.json"]


def test_directory_is_published_over_an_empty_one_and_stale_temporaries_go(tmp_path):
    out = tmp_path / "export"
    out.mkdir()
    stale = temp_path(out)
    stale.mkdir()
    (stale / "junk").write_text("from a crashed export")
    with atomic_path(out) as tmp:
        tmp.mkdir()
        (tmp / "config.json").write_text("{}")
    assert sorted(p.name for p in out.iterdir()) == ["config.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_unique_temporaries_differ_and_keep_the_dot_name_form(tmp_path):
    a, b = temp_path(tmp_path / "tokenizer.model", unique=True), temp_path(tmp_path / "tokenizer.model", unique=True)
    assert a != b and a.name.startswith(".tokenizer.model.") and a.name.endswith(".tmp")
    assert temp_path(tmp_path / "shard-00001.bin").name == ".shard-00001.bin.tmp"
