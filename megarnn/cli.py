"""`megarnn` command line: the only place that parses arguments.

    megarnn train CONFIG.yaml [key.sub=value ...] [--dry-run]
    megarnn tokenizer --input FILE... --vocab-size N --output DIR
    megarnn preprocess --input FILE...|hf:NAME --tokenizer DIR --output DIR [--workers N]
    megarnn generate MODEL_DIR [--prompt TEXT] [--max-new-tokens N] [--temperature T] [--top-k K] [--seed N]
    megarnn eval MODEL_DIR --data DIR [--seq-len N] [--batch-size N]
    megarnn export CHECKPOINT OUTPUT_DIR [--format safetensors|hf]
    megarnn bench step CONFIG.yaml [key.sub=value ...] [--steps N]   |   megarnn bench kernels [...]
    megarnn plot RUN [RUN ...] [--out FILE.png]
    megarnn plan CONFIG.yaml [key.sub=value ...] --world-size N [--rank R --materialize] [--json]

Errors caused by input (MegarnnError, bad arguments, a launcher's variables out of range) print
one line to stderr and exit with status 2 (tests/e2e/test_bad_input_catalogue.py).
A training run stopped by SIGUSR1 / SIGTERM / SIGINT (Ctrl-C) finishes its step, saves a
checkpoint and exits with status 75 (EX_TEMPFAIL: run the same command again to resume); a
second Ctrl-C exits at once with status 130, as does Ctrl-C in any other command.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path

from megarnn.errors import ConfigError, MegarnnError


def at_least(flag: str, value: int, minimum: int) -> None:
    """A numeric flag below its minimum -> ConfigError (one line, exit 2), before any work starts."""
    if value < minimum:
        raise ConfigError(f"{flag} {value}: must be >= {minimum}")


def _env_int(env, name: str, low: int, high: int | None, fix: str) -> int | None:
    raw = env.get(name)
    if raw is None:
        return None
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not an integer; {fix}") from None
    if value < low or (high is not None and value > high):
        bounds = f"between {low} and {high}" if high is not None else f">= {low}"
        raise ConfigError(f"{name}={value} must be {bounds}; {fix}")
    return value


def check_launch_env(env=os.environ) -> None:
    """The launcher's variables that the run will read (torchrun's RANK / WORLD_SIZE / LOCAL_RANK /
    MASTER_PORT, or srun's SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID) are integers in range:
    one line before anything starts, instead of a traceback or a rendezvous that never completes."""
    fix = ("these come from the launcher: start with launch/torchrun.sh, srun (launch/slurm/train.sbatch) or "
           "mpirun, or unset RANK and WORLD_SIZE to run one process")
    if "RANK" in env and "WORLD_SIZE" in env:
        world = _env_int(env, "WORLD_SIZE", 1, None, fix)
        _env_int(env, "RANK", 0, world - 1, fix)
        _env_int(env, "LOCAL_RANK", 0, None, fix)
    elif "SLURM_PROCID" in env and "SLURM_STEP_ID" in env:
        fix = "srun sets these for each task: run the training under srun (launch/slurm/train.sbatch)"
        tasks = _env_int(env, "SLURM_NTASKS", 1, None, fix)
        _env_int(env, "SLURM_PROCID", 0, None if tasks is None else tasks - 1, fix)
        _env_int(env, "SLURM_LOCALID", 0, None, fix)
    else:
        return  # one process: megarnn picks its own address and port
    _env_int(env, "MASTER_PORT", 1, 65535, "give a free TCP port, or unset MASTER_PORT "
             "(launch/torchrun.sh picks a free one, the sbatch script derives one from the job id)")


def cmd_train(args) -> int:
    from megarnn.config import load_config

    cfg = load_config(args.config, args.overrides)
    if not args.dry_run:
        check_launch_env()
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
        _shut_down_distributed()
        print(f"megarnn train: {e}", file=sys.stderr)
        return PREEMPTED_EXIT_CODE
    _shut_down_distributed()
    return 0


def _shut_down_distributed() -> None:
    """Every rank reached the same end (done, or stopped by a signal at the same step): meet, then
    tear the process groups down, rather than leave gloo's threads to the interpreter's exit."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def cmd_tokenizer(args) -> int:
    from megarnn.data.tokenizer import build_tokenizer

    tok = build_tokenizer(args.input, args.output, args.vocab_size, args.model_type, args.text_key)
    print(f"tokenizer with {tok.vocab_size} pieces written to {args.output}")
    return 0


def cmd_preprocess(args) -> int:
    from megarnn.data.preprocess import preprocess

    at_least("--workers", args.workers, 1)
    at_least("--docs-per-shard", args.docs_per_shard, 1)
    preprocess(args.input, args.tokenizer, args.output, workers=args.workers, text_key=args.text_key,
               docs_per_shard=args.docs_per_shard, log=print)
    return 0


def cmd_generate(args) -> int:
    from megarnn.generate import check_sampling, generate

    check_sampling(args.max_new_tokens, args.temperature, args.top_k)  # before the model loads
    import megarnn
    model, tokenizer = megarnn.load(args.model_dir)
    print(generate(model, tokenizer, args.prompt, args.max_new_tokens, args.temperature, args.top_k, args.seed))
    return 0


def cmd_eval(args) -> int:
    at_least("--seq-len", args.seq_len, 1)
    at_least("--batch-size", args.batch_size, 1)
    import megarnn
    from megarnn.data.indexed import IndexedDataset
    from megarnn.data.preprocess import MANIFEST, open_shards
    from megarnn.errors import DataError
    from megarnn.train.evaluate import evaluate

    data = Path(args.data)
    if not data.exists() and not data.with_suffix(".idx").is_file():
        raise DataError(f"--data {data} does not exist; give a directory of token shards (made by `megarnn "
                        "preprocess`, or a run's data/val) or one shard prefix")
    model, tokenizer = megarnn.load(args.model_dir)
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


def cmd_plot(args) -> int:
    from megarnn.plot import CURVES, metrics_file, plot_runs

    out = args.out or (metrics_file(args.runs[0]).parent / CURVES if len(args.runs) == 1 else Path(CURVES))
    print(f"curves of {len(args.runs)} run(s) written to {plot_runs(args.runs, out)}")
    return 0


def cmd_plan(args) -> int:
    from megarnn.plan import format_plan, load_plan_config, materialize, plan

    cfg = load_plan_config(args.config, args.overrides)
    at_least("--world-size", args.world_size, 1)
    result = plan(cfg, args.world_size)
    if args.materialize:
        if args.rank is None or not 0 <= args.rank < args.world_size:
            raise ConfigError(f"--materialize needs --rank R with 0 <= R < --world-size {args.world_size}")
        measured = materialize(cfg, args.world_size, args.rank)
        entry = next(e for e in result["ranks"] if args.rank in e["ranks"])
        entry = {**entry, "ranks": [args.rank], "measured_peak_bytes": measured["measured_peak_bytes"],
                 "measured_params": measured["params"], "seconds": measured["seconds"]}
        result = {**result, "ranks": [entry]}
    elif args.rank is not None:
        result = {**result, "ranks": [{**e, "ranks": [args.rank]} for e in result["ranks"] if args.rank in e["ranks"]]}
    if args.json:
        print(json.dumps(result))
        return 0
    print(format_plan(result))
    for e in result["ranks"]:
        if "measured_peak_bytes" in e:
            print(f"rank {e['ranks'][0]} built for real on the CPU (fp32), one forward + backward of a micro batch: "
                  f"peak resident memory {e['measured_peak_bytes'] / 2**30:.2f} GiB above the process's start, "
                  f"{e['measured_params'] / 1e9:.3f}B parameters, {e['seconds']:.0f} s")
    return 0


def cmd_bench(args) -> int:
    from megarnn.bench import bench_kernels, bench_step

    if args.what == "kernels":
        return bench_kernels(args.args)
    p = Parser(prog="megarnn bench step", formatter_class=HelpFormatter,
                                description="Time a config's optimizer steps on random tokens.")
    p.add_argument("config", help="A training config (YAML).")
    p.add_argument("overrides", nargs="*", help="Config overrides key.sub=value, e.g. parallel.tp=2.")
    p.add_argument("--steps", type=int, default=10, metavar="N", help="Timed optimizer steps.")
    p.add_argument("--warmup", type=int, default=3, metavar="N", help="Untimed steps first (compilation, allocation).")
    a, extra = p.parse_known_args(args.args)  # overrides may also follow the flags
    bench_step(a.config, a.overrides + extra, a.steps, a.warmup)
    return 0


class Parser(argparse.ArgumentParser):
    """argparse with its errors on one line (status 2), pointing at --help instead of printing the usage."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}; see `{self.prog} --help`\n")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows each option's default, except where there is none worth showing."""

    def _get_help_string(self, action):
        d = action.default
        empty = isinstance(d, (str, list)) and not d
        if action.required or empty or d is None or d is False or d is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="megarnn", description="Pretrain recurrent language models.",
                                formatter_class=HelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    def command(name: str, summary: str, description: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=summary, description=description, formatter_class=HelpFormatter)

    t = command("train", "train (or resume) a model from a YAML config",
                "Train a model as a YAML config says, or resume its run (train.resume=auto). SIGUSR1, "
                "SIGTERM or Ctrl-C: finish the step, save a checkpoint, exit 75; a second Ctrl-C exits at once.")
    t.add_argument("config", help="The run's config, e.g. configs/quickstart.yaml.")
    t.add_argument("overrides", nargs="*", help="Config overrides key.sub=value, e.g. train.max_steps=100.")
    t.add_argument("--dry-run", action="store_true",
                   help="Print the parameter count, the FLOPs per token and the resolved config, and stop.")
    t.set_defaults(func=cmd_train)

    k = command("tokenizer", "train a SentencePiece tokenizer, or import an existing .model",
                "Train a SentencePiece tokenizer on documents, or copy in an existing .model file.")
    k.add_argument("--input", nargs="+", required=True,
                   help="Text / jsonl / parquet files or globs, pkg:PACKAGE/dir/*.txt, hf:json:FILES, "
                        "hf:NAME[:CONFIG][@SPLIT]; or one existing .model file to import.")
    k.add_argument("--vocab-size", type=int, default=0, metavar="N",
                   help="The number of pieces to train (not needed to import a .model).")
    k.add_argument("--output", required=True, help="The tokenizer directory to write.")
    k.add_argument("--model-type", default="bpe", choices=["bpe", "unigram"], help="The SentencePiece algorithm.")
    k.add_argument("--text-key", default="text", help="The jsonl key / parquet column / dataset field with the text.")
    k.set_defaults(func=cmd_tokenizer)

    pp = command("preprocess", "tokenize documents into token shards (resumable, multi-process)",
                 "Tokenize documents into token shards for data.shards; run the same command again to resume.")
    pp.add_argument("--input", nargs="+", required=True,
                    help="Text / jsonl / parquet files or globs, pkg:PACKAGE/dir/*.txt, hf:json:FILES, "
                         "hf:NAME[:CONFIG][@SPLIT].")
    pp.add_argument("--tokenizer", required=True, help="A tokenizer directory or .model file.")
    pp.add_argument("--output", required=True, help="The shard directory; run the same command again to resume.")
    pp.add_argument("--workers", type=int, default=1, metavar="N", help="The number of tokenizing processes.")
    pp.add_argument("--text-key", default="text", help="The jsonl key / parquet column / dataset field with the text.")
    pp.add_argument("--docs-per-shard", type=int, default=100_000, metavar="N",
                    help="The number of documents in each shard.")
    pp.set_defaults(func=cmd_preprocess)

    g = command("generate", "sample text from a checkpoint",
                "Sample a continuation of a prompt from a trained model, one token at a time.")
    g.add_argument("model_dir", help="A run directory, its checkpoints/ directory, or one step_* checkpoint.")
    g.add_argument("--prompt", default="", metavar="TEXT",
                   help="The text to continue (default: none, start a new document).")
    g.add_argument("--max-new-tokens", type=int, default=200, metavar="N",
                   help="The most tokens to generate; fewer if the model ends the document.")
    g.add_argument("--temperature", type=float, default=0.8, metavar="T",
                   help="Divides the logits: lower is more conservative; 0 always picks the most likely token.")
    g.add_argument("--top-k", type=int, default=50, metavar="K",
                   help="Sample among the k most likely tokens only; 0 samples from the whole vocabulary.")
    g.add_argument("--seed", type=int, default=0, metavar="N",
                   help="The random seed: the same seed gives the same text.")
    g.set_defaults(func=cmd_generate)

    x = command("export", "checkpoint -> safetensors (ours) or Hugging Face layout",
                "Write a checkpoint's full model as safetensors (megarnn.load reads it) or in the Hugging Face layout.")
    x.add_argument("checkpoint", help="A run directory, its checkpoints/ directory, or one step_* checkpoint.")
    x.add_argument("output", help="A new (or empty) directory.")
    x.add_argument("--format", default="safetensors", choices=["safetensors", "hf"], help="The output layout.")
    x.set_defaults(func=cmd_export)

    b = command("bench", "train-step throughput of a config (random tokens), or the kernel benchmark",
                "Time a config's optimizer steps on random tokens (bench step), or run the kernel benchmark "
                "(bench kernels).")
    b.add_argument("what", choices=["step", "kernels"], help="What to time.")
    b.add_argument("args", nargs=argparse.REMAINDER,
                   help="For step: CONFIG.yaml [key=value ...] [--steps N] [--warmup N]; for kernels: the "
                        "arguments of tools/bench_kernels.py.")
    b.set_defaults(func=cmd_bench)

    e = command("eval", "loss, perplexity, bits per char/byte on token shards",
                "Loss, perplexity and bits per character / byte of a model on token shards, over whole documents.")
    e.add_argument("model_dir", help="A run directory, its checkpoints/ directory, or one step_* checkpoint.")
    e.add_argument("--data", required=True, help="A directory of *.idx/*.bin shards, or one shard prefix.")
    e.add_argument("--seq-len", type=int, default=512, metavar="N",
                   help="Tokens per forward pass; the recurrent state carries over, so it changes the speed, "
                        "not the result.")
    e.add_argument("--batch-size", type=int, default=8, metavar="N", help="Documents evaluated together.")
    e.set_defaults(func=cmd_eval)

    pn = command("plan", "per-rank memory and communication of a layout, built on the meta device",
                 "For a config (or a model file alone) and a world size, print per pipeline stage what a rank "
                 "holds (parameters, weights, gradients, optimizer state, activations with and without "
                 "activation checkpointing) and sends per step over each axis (tp, cp, pp, dp), and its "
                 "checkpoint bytes. Every rank's model is built as training builds it, on the meta device in a "
                 "fake process group: no memory, no other processes. --materialize builds --rank R for real "
                 "on the CPU and measures its peak memory through one forward and backward.")
    pn.add_argument("config", help="A training config or a model file (YAML), e.g. configs/model/griffin-14b.yaml.")
    pn.add_argument("overrides", nargs="*", help="Config overrides key.sub=value, e.g. parallel.tp=8 parallel.pp=4.")
    pn.add_argument("--world-size", type=int, required=True, metavar="N", help="Number of ranks (GPUs).")
    pn.add_argument("--rank", type=int, default=None, metavar="R", help="Only the entry of this rank.")
    pn.add_argument("--materialize", action="store_true", help="Build --rank R for real on the CPU and measure it.")
    pn.add_argument("--json", action="store_true", help="One JSON object instead of the table.")
    pn.set_defaults(func=cmd_plan)
    pl = command("plot", "loss (and other) curves of one or more runs as an image (needs matplotlib)",
                 "Draw the curves in runs' metrics.jsonl against steps: train and validation loss, val/bpc, the "
                 "learning rate, tokens/s and Newton iterations where logged; several runs are overlaid. Needs "
                 "matplotlib: pip install 'megarnn[plot]'.")
    pl.add_argument("runs", nargs="+", metavar="RUN", help="Run directories (train.out_dir), or metrics.jsonl files.")
    pl.add_argument("--out", metavar="FILE.png",
                    help="The image to write (default: RUN/curves.png for one run, curves.png here for several).")
    pl.set_defaults(func=cmd_plot)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # Overrides may come before or after flags (`train CFG --dry-run a.b=c`): argparse's
    # positional list stops at the first flag, so collect the rest here.
    args, extra = parser.parse_known_args(argv)
    if extra and (args.command != "train" or any("=" not in e or e.startswith("-") for e in extra)):
        subcommands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
        subcommands[args.command].error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.overrides = args.overrides + extra
    with _ctrl_c_exits(args.command):
        try:
            return args.func(args)
        except MegarnnError as e:
            print(f"megarnn {args.command}: error: {e}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:  # Ctrl-C outside a training loop (which saves and exits 75 instead)
            print(f"megarnn {args.command}: interrupted", file=sys.stderr)
            return 130


@contextlib.contextmanager
def _ctrl_c_exits(command: str):
    """While a command runs, Ctrl-C prints one line and exits 130 at once, wherever it lands: a
    KeyboardInterrupt raised inside a library's import (torch's, while a command starts) can turn
    into another error or be swallowed. The trainer installs its own handler for the training run
    (checkpoint, then exit 75) and puts this one back afterwards."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupted(signum, frame):
        os.write(2, f"megarnn {command}: interrupted\n".encode())
        os._exit(130)

    old = signal.signal(signal.SIGINT, interrupted)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)
