"""`megarnn` command line: the only place that parses arguments.

    megarnn train CONFIG.yaml [key.sub=value ...] [--dry-run]
    megarnn tokenizer --input FILE... --vocab-size N --output DIR
    megarnn preprocess --input FILE...|hf:NAME --tokenizer DIR --output DIR [--workers N]
    megarnn generate MODEL_DIR --prompt TEXT [--max-new-tokens N]
    megarnn eval MODEL_DIR --data DIR
    megarnn export CHECKPOINT OUTPUT_DIR [--format safetensors|hf]
    megarnn bench step CONFIG.yaml [key.sub=value ...] [--steps N]   |   megarnn bench kernels [...]

Errors caused by input (MegarnnError) print one line to stderr and exit with status 2.
A training run stopped by SIGUSR1 / SIGTERM / SIGINT (Ctrl-C) finishes its step, saves a
checkpoint and exits with status 75 (EX_TEMPFAIL: run the same command again to resume); a
second Ctrl-C exits at once with status 130, as does Ctrl-C in any other command.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from megarnn.errors import MegarnnError


def cmd_train(args) -> int:
    from megarnn.config import load_config

    cfg = load_config(args.config, args.overrides)
    if args.dry_run:
        import dataclasses

        import torch

        from megarnn.models import RecurrentLM
        mc = cfg.model if cfg.model.vocab_size else dataclasses.replace(cfg.model, vocab_size=cfg.data.vocab_size)
        with torch.device("meta"):  # shapes only: a 14B model needs no memory here
            model = RecurrentLM(mc)
        embedding = model.embed_tokens.weight.numel()
        print(f"parameters: {model.num_params():,} ({model.num_params() - embedding:,} without the embedding)")
        print(f"training FLOPs per token at seq_len={cfg.data.seq_len}: {model.flops_per_token(cfg.data.seq_len):,.0f}")
        print(cfg.to_yaml(), end="")
        return 0
    from megarnn.train.loop import PREEMPTED_EXIT_CODE, Preempted, train
    try:
        train(cfg)
    except Preempted as e:
        print(f"megarnn train: {e}", file=sys.stderr)
        return PREEMPTED_EXIT_CODE
    return 0


def cmd_tokenizer(args) -> int:
    from megarnn.data.tokenizer import build_tokenizer

    tok = build_tokenizer(args.input, args.output, args.vocab_size, args.model_type, args.text_key)
    print(f"tokenizer with {tok.vocab_size} pieces written to {args.output}")
    return 0


def cmd_preprocess(args) -> int:
    from megarnn.data.preprocess import preprocess

    preprocess(args.input, args.tokenizer, args.output, workers=args.workers, text_key=args.text_key,
               docs_per_shard=args.docs_per_shard, log=print)
    return 0


def cmd_generate(args) -> int:
    import megarnn
    from megarnn.generate import generate

    model, tokenizer = megarnn.load(args.model_dir)
    print(generate(model, tokenizer, args.prompt, args.max_new_tokens, args.temperature, args.top_k, args.seed))
    return 0


def cmd_eval(args) -> int:
    import megarnn
    from megarnn.data.indexed import IndexedDataset
    from megarnn.data.preprocess import MANIFEST, open_shards
    from megarnn.errors import DataError
    from megarnn.train.evaluate import evaluate

    model, tokenizer = megarnn.load(args.model_dir)
    data = Path(args.data)
    if data.is_dir() and ((data / MANIFEST).is_file() or any(data.glob("shard-*.idx"))):
        datasets = open_shards(data, tokenizer)  # a `megarnn preprocess` directory, complete and checked
    else:
        prefixes = sorted(p.with_suffix("") for p in data.glob("*.idx")) if data.is_dir() else [data]
        if not prefixes:
            raise DataError(f"{data}: no *.idx shards found; pass a directory of shards or one shard prefix")
        datasets = [IndexedDataset(prefix) for prefix in prefixes]
        for ds in datasets:
            ds.check_tokenizer(tokenizer.sha256, tokenizer.vocab_size)
    r = evaluate(model, datasets, args.seq_len, args.batch_size)
    out = {"loss": r["loss"], "perplexity": r["ppl"], "bits_per_char": r["bpc"], "bits_per_byte": r["bpb"],
           "tokens": r["tokens"]}
    print(json.dumps(out, indent=1))
    return 0


def cmd_export(args) -> int:
    from megarnn.export import export

    out = export(args.checkpoint, args.output, args.format)
    print(f"exported to {out}")
    return 0


def cmd_bench(args) -> int:
    from megarnn.bench import bench_kernels, bench_step

    if args.what == "kernels":
        return bench_kernels(args.args)
    p = argparse.ArgumentParser(prog="megarnn bench step")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    p.add_argument("--steps", type=int, default=10, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation, allocation)")
    a, extra = p.parse_known_args(args.args)  # overrides may also follow the flags
    bench_step(a.config, a.overrides + extra, a.steps, a.warmup)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="megarnn", description="Pretrain recurrent language models.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train (or resume) a model from a YAML config")
    t.add_argument("config")
    t.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train.max_steps=100")
    t.add_argument("--dry-run", action="store_true", help="print parameters, FLOPs per token and the config")
    t.set_defaults(func=cmd_train)

    k = sub.add_parser("tokenizer", help="train a SentencePiece tokenizer, or import an existing .model")
    k.add_argument("--input", nargs="+", required=True,
                   help="text/jsonl/parquet files or globs, pkg:PACKAGE/dir/*.txt, hf:json:FILES, "
                        "hf:NAME[:CONFIG][@SPLIT]; or one existing .model file to copy in")
    k.add_argument("--vocab-size", type=int, default=0, help="pieces to train (not needed to import a .model)")
    k.add_argument("--output", required=True)
    k.add_argument("--model-type", default="bpe", choices=["bpe", "unigram"])
    k.add_argument("--text-key", default="text", help="jsonl key / parquet column / dataset field with the text")
    k.set_defaults(func=cmd_tokenizer)

    pp = sub.add_parser("preprocess", help="tokenize documents into token shards (resumable, multi-process)")
    pp.add_argument("--input", nargs="+", required=True,
                    help="text/jsonl/parquet files or globs, pkg:PACKAGE/dir/*.txt, hf:json:FILES, hf:NAME[:CONFIG][@SPLIT]")
    pp.add_argument("--tokenizer", required=True, help="a tokenizer directory or .model file")
    pp.add_argument("--output", required=True, help="the shard directory; run the same command again to resume")
    pp.add_argument("--workers", type=int, default=1, help="tokenizing processes")
    pp.add_argument("--text-key", default="text", help="jsonl key / parquet column / dataset field with the text")
    pp.add_argument("--docs-per-shard", type=int, default=100_000)
    pp.set_defaults(func=cmd_preprocess)

    g = sub.add_parser("generate", help="sample text from a checkpoint")
    g.add_argument("model_dir", help="a run directory, its checkpoints/ directory, or one step_* checkpoint")
    g.add_argument("--prompt", default="")
    g.add_argument("--max-new-tokens", type=int, default=200)
    g.add_argument("--temperature", type=float, default=0.8)
    g.add_argument("--top-k", type=int, default=50)
    g.add_argument("--seed", type=int, default=0)
    g.set_defaults(func=cmd_generate)

    x = sub.add_parser("export", help="checkpoint -> safetensors (ours) or Hugging Face layout")
    x.add_argument("checkpoint", help="a run directory, its checkpoints/ directory, or one step_* checkpoint")
    x.add_argument("output", help="a new (or empty) directory")
    x.add_argument("--format", default="safetensors", choices=["safetensors", "hf"])
    x.set_defaults(func=cmd_export)

    b = sub.add_parser("bench", help="train-step throughput of a config (random tokens), or the kernel benchmark")
    b.add_argument("what", choices=["step", "kernels"])
    b.add_argument("args", nargs=argparse.REMAINDER,
                   help="step: CONFIG.yaml [key=value ...] [--steps N] [--warmup N]; kernels: tools/bench_kernels.py's")
    b.set_defaults(func=cmd_bench)

    e = sub.add_parser("eval", help="loss, perplexity, bits per char/byte on token shards")
    e.add_argument("model_dir")
    e.add_argument("--data", required=True, help="a directory of *.idx/*.bin shards, or one shard prefix")
    e.add_argument("--seq-len", type=int, default=512)
    e.add_argument("--batch-size", type=int, default=8)
    e.set_defaults(func=cmd_eval)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # Overrides may come before or after flags (`train CFG --dry-run a.b=c`): argparse's
    # positional list stops at the first flag, so collect the rest here.
    args, extra = parser.parse_known_args(argv)
    if extra and (args.command != "train" or any("=" not in e or e.startswith("-") for e in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.overrides = args.overrides + extra
    try:
        return args.func(args)
    except MegarnnError as e:
        print(f"megarnn {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C outside a training loop (which saves and exits 75 instead)
        print(f"megarnn {args.command}: interrupted", file=sys.stderr)
        return 130
