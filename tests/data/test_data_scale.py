"""Data that scales with the ranks: shard checksums split over the ranks (each shard hashed by
exactly one), the document index memory-mapped and compact, and the packed samples unchanged."""
import numpy as np
import pytest

from megarnn.data.indexed import IndexedDataset, verify_share, write_shard
from megarnn.data.loader import PackedLoader
from megarnn.errors import DataError


def _shards(tmp_path, n=5):
    rng = np.random.default_rng(0)
    out = []
    for k in range(n):
        docs = [rng.integers(0, 500, int(rng.integers(1, 90))) for _ in range(10 + 7 * k)]
        write_shard(tmp_path / f"s{k}", docs, [len(d) for d in docs], [2 * len(d) for d in docs], 512, "tok")
        out.append(IndexedDataset(tmp_path / f"s{k}", verify=False))
    return out


@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_each_shard_is_hashed_by_exactly_one_rank(tmp_path, world, monkeypatch):
    shards = _shards(tmp_path)
    hashed = []
    monkeypatch.setattr(IndexedDataset, "verify_checksums", lambda self: hashed.append(self.prefix))
    per_rank = [verify_share(shards, r, world) for r in range(world)]
    assert sorted(hashed) == sorted(ds.prefix for ds in shards)
    assert sum(per_rank) == sum(ds.nbytes for ds in shards)
    assert max(per_rank) <= sum(per_rank) / world + max(ds.nbytes for ds in shards)


def test_a_corrupt_shard_stops_the_rank_that_hashes_it(tmp_path):
    shards = _shards(tmp_path)
    bad = tmp_path / "s3.bin"
    data = bytearray(bad.read_bytes())
    data[5] ^= 0xFF
    bad.write_bytes(bytes(data))
    shards = [IndexedDataset(tmp_path / f"s{k}", verify=False) for k in range(5)]  # sizes still right
    failed = []
    for r in range(3):
        try:
            verify_share(shards, r, 3)
        except DataError as e:
            failed.append((r, str(e)))
    assert len(failed) == 1 and f"{bad}: checksum mismatch" in failed[0][1]


def test_the_index_is_memory_mapped_and_compact(tmp_path):
    shards = _shards(tmp_path)
    assert all(isinstance(ds.offsets, np.memmap) for ds in shards)  # shared by the page cache
    loader = PackedLoader(shards, 16, 2, 1, seed=3, val_fraction=0.2)
    loader.micro_batch(0, 0)
    s = loader.samples
    assert s._order.dtype == np.uint32 and s._sample_order.dtype == np.uint32 and s._doc_ids.dtype == np.uint32
    assert not hasattr(s, "_start") and not hasattr(s, "_len")  # no per-rank copy of the offsets
