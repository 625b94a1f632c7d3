"""Turn a run's `data:` config into a tokenizer and token shards inside the run directory.

    tokenizer, train, val = prepare_run_data(cfg.data, run_dir)

The tokenizer is `data.tokenizer` when given, else the one already in the run directory
(a resumed run), else trained on the training documents. Shards are rebuilt only when
the source files or the tokenizer changed. Validation documents are `data.val_files`
plus the training files named in `data.holdout` (whole files, so nothing leaks).
"""
from __future__ import annotations

from pathlib import Path

from megarnn.config import DataConfig
from megarnn.data.corpus import file_source, fingerprint, iter_raw_batches, read_documents, resolve_files
from megarnn.data.indexed import IndexedDataset, ShardWriter, verify_share
from megarnn.data.preprocess import encode_in_order
from megarnn.data.tokenizer import MODEL_FILE, Tokenizer, train_tokenizer
from megarnn.errors import DataError


def split_files(cfg: DataConfig) -> tuple[list[Path], list[Path]]:
    train = resolve_files(cfg.train_files)
    names = {f.name for f in train}
    missing = [h for h in cfg.holdout if h not in names]
    if missing:
        raise DataError(f"data.holdout names {missing}, which are not among data.train_files "
                        f"(e.g. {sorted(names)[:3]}); use file names as they appear there")
    val = [f for f in train if f.name in cfg.holdout] + (resolve_files(cfg.val_files) if cfg.val_files else [])
    train = [f for f in train if f.name not in cfg.holdout]
    if not train:
        raise DataError("every training file is held out (data.holdout); keep at least one for training")
    return train, val


def load_or_train_tokenizer(cfg: DataConfig, run_dir: Path, train_files: list[Path]) -> Tokenizer:
    if cfg.tokenizer:
        tok = Tokenizer.load(cfg.tokenizer)
        tok.save(run_dir / "tokenizer")  # the run directory carries the tokenizer it was trained with
        return tok
    saved = run_dir / "tokenizer" / MODEL_FILE
    if saved.is_file():
        return Tokenizer.load(saved)
    docs = (d for f in train_files for d in read_documents(f, cfg.text_key))
    tok = train_tokenizer(docs, cfg.vocab_size, cfg.tokenizer_type)
    tok.save(run_dir / "tokenizer")
    return tok


def build_shard(files: list[Path], tokenizer: Tokenizer, prefix: Path, text_key: str) -> IndexedDataset:
    """Tokenize `files` into one shard at `prefix`, or reuse it if sources and tokenizer match."""
    sources = [file_source(f) for f in files]
    fp = fingerprint(sources)
    if Path(f"{prefix}.idx").is_file():
        try:
            ds = IndexedDataset(prefix)
            if ds.header.get("sources_sha256") == fp and ds.header["tokenizer_sha256"] == tokenizer.sha256:
                return ds
        except DataError:
            pass  # stale or damaged: rebuild below
    extra = {"sources_sha256": fp, "sources": [str(f) for f in files]}
    with ShardWriter(prefix, tokenizer.vocab_size, tokenizer.sha256, extra) as w:
        for enc in encode_in_order(iter_raw_batches(sources, text_key), tokenizer, 1, text_key):
            w.add(enc.tokens, enc.lengths, enc.n_chars, enc.n_bytes)
    return IndexedDataset(prefix)


def prepare_run_data(cfg: DataConfig, run_dir: Path) -> tuple[Tokenizer, IndexedDataset, IndexedDataset | None]:
    train_files, val_files = split_files(cfg)
    tok = load_or_train_tokenizer(cfg, run_dir, train_files)
    train = build_shard(train_files, tok, run_dir / "data" / "train", cfg.text_key)
    val = build_shard(val_files, tok, run_dir / "data" / "val", cfg.text_key) if val_files else None
    return tok, train, val


def shard_loader(shard_dirs: list[str], tokenizer: Tokenizer, seq_len: int, micro_batch_size: int,
                 grad_accum: int, seed: int, dp_rank: int, dp_size: int, weights: list[float] | None = None,
                 val_fraction: float = 0.0, verify: bool = True):
    """Training loader and held-out documents over directories made by `megarnn preprocess`.

    Without weights the directories form one corpus (documents numbered across them in order);
    with weights (one per directory) each is a corpus of the blend. Returns (PackedLoader,
    list of DocumentSubset for evaluate, or None when val_fraction is 0).

    verify: the shards' checksums, split over the ranks of the launch (verify_ranks); each
    rank hashes about 1 / world of the corpus (see verify_ranks for why, not every rank all).
    """
    from megarnn.data.loader import PackedLoader, validation_split
    from megarnn.data.preprocess import open_shards

    corpora = [open_shards(d, tokenizer, verify=False) for d in shard_dirs]  # headers, sizes, manifest
    if verify:
        verify_share([ds for c in corpora for ds in c], *verify_ranks())
    if weights:
        if len(weights) != len(corpora):
            raise DataError(f"{len(weights)} blend weights for {len(corpora)} shard directories; give one each")
        groups = corpora
    else:
        groups = [[ds for c in corpora for ds in c]]
    data = groups if weights else groups[0]
    loader = PackedLoader(data, seq_len, micro_batch_size, grad_accum, seed, dp_rank, dp_size,
                          weights=list(weights) if weights else None, val_fraction=val_fraction)
    val = [validation_split(g, val_fraction) for g in groups] if val_fraction > 0 else None
    return loader, val


def verify_ranks() -> tuple[int, int]:
    """(rank, world) that split the checksums of data.shards: torch.distributed's when it is
    initialized (every rank of the launch), else (0, 1).

    Split by shard over the ranks, each hashed by exactly one: a bad shard stops the rank that
    finds it with a DataError naming the file, and the launcher ends the others. Chosen over
    per-chunk checksums checked on first read because it needs no new shard format (the shards
    of `megarnn preprocess` carry whole-file sha256s), costs each rank corpus / world bytes
    once at the start instead of a hash on every read, and fails before training rather than
    hours into it; there is no all-reduce, as the ranks open the data at different times (rank
    0 first, then the others) and one failure ends the run anyway."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def build_run_data(cfg: DataConfig, run_dir: Path, seq_len_batch: tuple[int, int, int], seed: int,
                   dp_rank: int, dp_size: int):
    """The run's (tokenizer, training loader, validation datasets or None) for whichever source
    the config names. seq_len_batch: (seq_len, micro_batch_size, grad_accum)."""
    from megarnn.data.loader import PackedLoader, StreamingLoader, read_validation
    T, mb, ga = seq_len_batch
    if cfg.train_files:
        tok, train, val = prepare_run_data(cfg, run_dir)
        return tok, PackedLoader([train], T, mb, ga, seed, dp_rank, dp_size), val
    if cfg.shards:
        for d in cfg.shards:
            if not Path(d).is_dir():
                raise DataError(f"data.shards: {d!r} is not a directory; give directories made by "
                                "`megarnn preprocess --output DIR`")
        tok = Tokenizer.load(cfg.tokenizer or Path(cfg.shards[0]) / "tokenizer")
        loader, val = shard_loader(cfg.shards, tok, T, mb, ga, seed, dp_rank, dp_size, cfg.weights or None,
                                   cfg.val_fraction, cfg.verify_shards)
        return tok, loader, val
    tok = Tokenizer.load(cfg.tokenizer)
    loader = StreamingLoader(cfg.stream, tok, T, mb, ga, seed, dp_rank, dp_size, cfg.text_key, cfg.shuffle_block,
                             cfg.val_fraction, cfg.tokenizer_threads, cfg.stream_workers)
    val_inputs = cfg.val_files or cfg.stream
    val = read_validation(val_inputs, tok, cfg.text_key, 0.0 if cfg.val_files else cfg.val_fraction, cfg.val_docs) \
        if cfg.val_files or cfg.val_fraction > 0 else None
    return tok, loader, val
