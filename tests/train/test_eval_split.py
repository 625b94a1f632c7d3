"""Validation split over data-parallel ranks (megarnn/train/evaluate.py): each of 2 gloo ranks
reads every other document, the sums are all-reduced, and every rank reports the loss and
bits per character of one process reading all of them."""
import numpy as np
import pytest
import torch

from megarnn.parallel.launch_env import free_port
from tests.parallel.spawn_util import run_on_ranks


class _Docs:
    """Documents in memory, read like an IndexedDataset."""

    def __init__(self, seed: int, n: int, vocab: int):
        rng = np.random.default_rng(seed)
        self.docs = [rng.integers(0, vocab, int(rng.integers(2, 150))).astype(np.int32) for _ in range(n)]
        self.n_chars = np.array([3 * len(d) + 1 for d in self.docs], np.int64)
        self.n_bytes = self.n_chars + 2
        self.n_tokens = sum(len(d) for d in self.docs)

    def __len__(self):
        return len(self.docs)

    def __getitem__(self, i):
        return self.docs[i]


def _model():
    from megarnn.config import load_config
    from megarnn.models import RecurrentLM
    from tests.conftest import ROOT
    cfg = load_config(ROOT / "configs" / "quickstart.yaml", ["model=configs/model/griffin-tiny.yaml",
                                                             "model.vocab_size=64"])
    torch.manual_seed(3)
    return RecurrentLM(cfg.model)


def _data():
    return [_Docs(1, 13, 64), _Docs(2, 4, 64)]  # uneven: rank 0 gets 7 + 2, rank 1 gets 6 + 2


def _check(want, out_dir):
    import torch.distributed as dist

    from megarnn.train.evaluate import evaluate
    got = evaluate(_model(), _data(), seq_len=32, batch_size=3, group=dist.group.WORLD)
    torch.save(got, f"{out_dir}/rank{dist.get_rank()}.pt")


def _on_rank(rank, world, port, want, out_dir):
    run_on_ranks(rank, world, port, _check, want, out_dir)


def test_two_dp_ranks_report_the_one_process_numbers(tmp_path):
    import torch.multiprocessing as mp

    from megarnn.train.evaluate import evaluate
    torch.set_num_threads(1)
    want = evaluate(_model(), _data(), seq_len=32, batch_size=3)
    mp.spawn(_on_rank, args=(2, free_port(), want, str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got["tokens"] == want["tokens"]
        for k in ("loss", "bpc", "bpb", "ppl"):
            assert got[k] == pytest.approx(want[k], rel=1e-6), k
