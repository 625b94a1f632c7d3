"""The training loop: data -> DeepSpeed engine -> steps, eval, checkpoints, metrics.

    train(load_config("configs/quickstart.yaml"))

Order of work, so that bad input fails before anything is written: check the config,
the data files, the output directory and any checkpoint to resume from; then prepare the
tokenizer and shards, build the model and engine, resume, and loop.
"""
from __future__ import annotations

import dataclasses
import os
import signal
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist
import yaml

from megarnn.config import Config
from megarnn.data.prepare import build_run_data, split_files
from megarnn.errors import ConfigError, DataError, TrainingError
from megarnn.models import RecurrentLM
from megarnn.train import checkpoint, watchdog
from megarnn.parallel.mesh import ParallelMesh
from megarnn.parallel.pipeline import full_model, pipeline_module
from megarnn.parallel.construct import build_local
from megarnn.parallel.plan import sequence_count, whole_sequences
from megarnn.train.engine import SkipNonFiniteAdamW, build_engine, lr_lambda, setup_distributed, zero3_partitioner
from megarnn.train.evaluate import evaluate, text_size
from megarnn.train.metrics import MetricsLogger, peak_flops

FINAL_LINE = "held-out bits per character: {:.3f}"
VOCAB_MULTIPLE = 128


def check_writable(out_dir: Path) -> None:
    """Fail early, before writing anything, if out_dir cannot be created or written."""
    probe = out_dir
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"train.out_dir={str(out_dir)!r} is not writable ({probe} is not a writable "
                          "directory); choose a directory you can write, e.g. train.out_dir=runs/x")


def check_schedule(t) -> None:
    """The LR schedule must reach its peak: warmup has to end before the run does."""
    if t.warmup_steps >= t.max_steps:
        raise ConfigError(f"train.warmup_steps={t.warmup_steps} >= train.max_steps={t.max_steps}: the learning rate "
                          f"would never reach its peak train.lr={t.lr:g}; lower train.warmup_steps (e.g. "
                          f"train.warmup_steps={t.max_steps // 10}) or raise train.max_steps")


def check_validation(d, val_ds, loader) -> tuple[int, int, int] | None:
    """(documents, tokens to predict, characters) of the validation set, None without one; DataError
    when it has no text (it would report a loss of 0 and 0 bits per character)."""
    if val_ds is None:
        return None
    docs, tokens, chars = text_size(val_ds)
    if tokens and chars:
        return docs, tokens, chars
    if d.shards:
        corpora = getattr(loader.samples, "corpora", [loader.samples])
        total = docs + sum(c.n_docs for c in corpora)
        hint = min(0.5, max(2 * d.val_fraction, 10 / total))
        raise DataError(f"data.val_fraction={d.val_fraction} holds out {docs} of the {total} documents in "
                        f"data.shards: no held-out text; raise data.val_fraction (e.g. data.val_fraction={hint:.2g}), "
                        "or set data.val_fraction=0 to train without validation")
    if d.stream:
        raise DataError(f"the validation documents of data.stream (data.val_fraction={d.val_fraction}, data.val_files="
                        f"{d.val_files}) have no text; raise data.val_fraction or give data.val_files with text")
    raise DataError(f"the validation files (data.holdout={d.holdout}, data.val_files={d.val_files}) hold {docs} "
                    f"document(s) and {chars} characters of text; name files with text, or set data.holdout=[] "
                    "data.val_files=[] to train without validation")


def describe_data(loader, seq_len: int, max_steps: int) -> tuple[str, float]:
    """A line on the training data: tokens in the corpus, tokens per step, epochs the run makes
    -> (line, epochs; the most over blended corpora; 0 when streamed, whose size is unknown)."""
    gbs = loader.global_batch_size
    per_step = f"{gbs * seq_len:,} tokens per step ({gbs} sequences of {seq_len})"
    run = f"{max_steps} steps read {max_steps * gbs * seq_len:,} tokens"
    samples = getattr(loader, "samples", None)
    if samples is None:
        return f"data: streamed, size unknown; {per_step}; {run}", 0.0
    if hasattr(samples, "corpora"):  # a blend: each corpus gets its share of every step's samples
        epochs = [max_steps * gbs * n / samples.period / c.samples_per_epoch
                  for c, n in zip(samples.corpora, samples.counts)]
        n_tokens = sum(c.n_tokens for c in samples.corpora)
        return (f"data: {n_tokens:,} training tokens; {per_step}; {run}: "
                f"{' / '.join(f'{e:.3g}' for e in epochs)} epochs of the blended corpora"), max(epochs)
    epochs = max_steps * gbs / samples.samples_per_epoch
    return f"data: {samples.n_tokens:,} training tokens; {per_step}; {run}: {epochs:.3g} epochs", epochs


def draw_curves(run_dir: Path, log) -> None:
    """run_dir/curves.png at the end of a run where matplotlib is installed (nothing otherwise); a
    drawing that fails costs a line, not the finished run."""
    from megarnn.plot import write_curves
    try:
        path = write_curves(run_dir)
    except Exception as e:  # noqa: BLE001
        log.text(f"curves not drawn: {type(e).__name__}: {e}")
        return
    if path is not None:
        log.text(f"curves: {path}")


SCHEDULE_KEYS = ("max_steps", "warmup_steps", "lr", "min_lr_ratio")


def schedule_changes(saved: dict, t) -> dict:
    """{key: (checkpoint's, config's)} of the LR schedule keys that differ; saved: the
    checkpoint's train config (a dict; keys it lacks count as unchanged)."""
    return {k: (saved[k], getattr(t, k)) for k in SCHEDULE_KEYS if k in saved and saved[k] != getattr(t, k)}


def describe_changes(changes: dict) -> str:
    return ", ".join(f"train.{k}: checkpoint {a} vs config {b}" for k, (a, b) in changes.items())


def check_schedule_on_resume(ckpt: Path, t) -> None:
    """A resumed run keeps the checkpoint's LR schedule unless train.resume_schedule=new: raising
    max_steps would otherwise silently re-stretch the cosine from the saved step on."""
    saved = ckpt / "config.yaml"
    if t.resume_schedule == "new" or not saved.is_file():
        return
    changes = schedule_changes((yaml.safe_load(saved.read_text()) or {}).get("train", {}), t)
    if changes:
        same = " ".join(f"train.{k}={a}" for k, (a, _) in changes.items())
        raise ConfigError(f"resuming from {ckpt} with another LR schedule ({describe_changes(changes)}); "
                          f"keep the checkpoint's ({same}), or set train.resume_schedule=new to continue on "
                          "this config's schedule from the saved step (logged), or start afresh with "
                          "train.resume=never or a new train.out_dir")


def restart_schedule(engine, cfg: Config) -> None:
    """train.resume_schedule=new: the loaded LR scheduler continues on this config's schedule (its
    lambda is already the config's; the peak lr it scales comes from the checkpoint)."""
    scheduler = engine.lr_scheduler
    scheduler.base_lrs = [cfg.train.lr] * len(scheduler.base_lrs)
    factor = lr_lambda(cfg)(scheduler.last_epoch)
    for group in scheduler.optimizer.param_groups:
        group["lr"] = cfg.train.lr * factor
    scheduler._last_lr = [g["lr"] for g in scheduler.optimizer.param_groups]


def find_resume(cfg: Config) -> Path | None:
    """The checkpoint to resume from, checked against the config, or None to start fresh."""
    r = cfg.train.resume
    if r == "never":
        return None
    target = Path(cfg.train.out_dir) / "checkpoints" if r == "auto" else Path(r)
    if r == "auto" and not (target / "latest").is_file():
        return None
    ckpt_dir, tag = checkpoint.resolve_checkpoint(target)
    meta = checkpoint.read_meta(ckpt_dir, tag)
    check_cfg = cfg
    if cfg.model.vocab_size == 0:  # filled from the tokenizer later; compare the rest now
        check_cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=meta["model"]["vocab_size"]))
    checkpoint.check_compatible(meta, check_cfg, ckpt_dir / tag)
    check_schedule_on_resume(ckpt_dir / tag, cfg.train)
    return ckpt_dir / tag


PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: the job stopped cleanly and should be run again
INTERRUPTED_EXIT_CODE = 130  # 128 + SIGINT: a second Ctrl-C, no checkpoint saved
# A second SIGINT this soon after the first is the same Ctrl-C again: torchrun (and mpirun) relay
# the SIGINT they get from the terminal to workers that got it from the terminal already.
RELAYED_SIGINT_SECONDS = 0.25


class Preempted(Exception):
    """SIGUSR1 / SIGTERM / SIGINT arrived: the step finished, a checkpoint was saved, the run stopped."""


class PreemptionWatch:
    """Turns SIGUSR1, SIGTERM and SIGINT (Ctrl-C) into a flag that every rank sees at the same step.

    The handler only records the signal; the loop finishes its step, and `requested()`
    (a max all-reduce, so all ranks agree) tells it to save and stop. A second Ctrl-C after
    a stop was requested exits at once with status 130, without a checkpoint.
    """

    SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)

    def __enter__(self):
        self.signal_name, self._since, self._old = None, 0.0, {}
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signal_name is None:
            self.signal_name, self._since = signal.Signals(signum).name, time.monotonic()
        elif signum == signal.SIGINT and time.monotonic() - self._since > RELAYED_SIGINT_SECONDS:
            if os.environ.get("RANK", "0") == "0":
                os.write(2, b"megarnn train: interrupted again: exiting now without saving a checkpoint; "
                            b"rerun the same command to resume from the last one\n")
            os._exit(INTERRUPTED_EXIT_CODE)

    def requested(self) -> bool:
        flag = torch.tensor([1.0 if self.signal_name else 0.0])
        if dist.is_initialized() and dist.get_backend() == "nccl":
            flag = flag.cuda()
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        stop = bool(flag.item())  # the one host read of the check
        if stop and not self.signal_name:
            self.signal_name, self._since = "a signal on another rank", time.monotonic()
        return stop

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            # After a stop the checkpoint is saved and this process exits 75. When the first rank
            # exits, launchers TERM the others (srun --kill-on-bad-exit, torchrun): ignoring that
            # keeps every rank's status 75, which is what tells the sbatch script to requeue.
            # A further Ctrl-C still exits at once (130).
            if self.signal_name:
                signal.signal(sig, self._handle if sig == signal.SIGINT else signal.SIG_IGN)
            else:
                signal.signal(sig, old)
        return False


def local_micro_batch(loader, step: int, micro: int, mesh: ParallelMesh, device) -> dict[str, torch.Tensor]:
    """This rank's rows of micro batch `micro` of step `step`, and under context parallelism its
    chunk of time: tokens, targets, reset, loss_mask, each (B, T / cp)."""
    b = loader.micro_batch(step, micro)
    n, i = b["tokens"].shape[1] // mesh.cp, mesh.rank_in("cp")
    return {k: v[:, i * n:(i + 1) * n].to(device) for k, v in b.items()}


def train_step(engine, loader, step: int, grad_accum: int, mesh: ParallelMesh, device):
    """One optimizer step over grad_accum micro batches -> (mean loss over all ranks, grad norm).

    Both stay where they are (the loss a device tensor, the norm whatever the optimizer keeps):
    reading them on the host waits for the step's kernels, so the loop reads them only when it
    logs (`as_float`)."""
    if mesh.pp > 1:
        return pipeline_step(engine, loader, step, grad_accum, mesh, device)
    loss_sum = torch.zeros((), device=device)
    for micro in range(grad_accum):
        b = local_micro_batch(loader, step, micro, mesh, device)
        watchdog.beat("forward")
        logits, _ = engine(b["tokens"], reset=b["reset"])
        count = sequence_count(b["loss_mask"], mesh.group("cp") if mesh.cp > 1 else None)
        loss = engine.module.masked_loss(logits, b["targets"], b["loss_mask"], count)
        # DeepSpeed averages gradients over dp x cp; x cp turns the cp average into the sum of shares.
        watchdog.beat("backward")
        engine.backward(loss * mesh.cp)
        watchdog.beat("optimizer")
        engine.step()
        loss_sum += loss.detach()
    # Context-parallel shares add up to each replica's loss; tensor-parallel ranks hold the same loss.
    watchdog.beat("loss all-reduce")
    dist.all_reduce(loss_sum, group=mesh.group("dp_cp"))
    return loss_sum / (grad_accum * mesh.dp), grad_norm_value(engine)


def pipeline_step(engine, loader, step: int, grad_accum: int, mesh: ParallelMesh, device):
    """The same step through DeepSpeed's 1F1B schedule: the first stage reads (tokens, reset), the
    last (targets, loss_mask); the engine returns the loss averaged over micro batches and
    replicas on every stage (the loss function is x cp, see PipelineLoss)."""
    def micro_batches():
        for micro in range(grad_accum):
            b = local_micro_batch(loader, step, micro, mesh, device)
            yield (b["tokens"], b["reset"].long()), (b["targets"], b["loss_mask"].long())
    watchdog.beat("pipeline schedule (forward, backward, optimizer)")
    loss = engine.train_batch(micro_batches())
    return loss.detach(), grad_norm_value(engine)


def grad_norm_value(engine):
    """The step's gradient norm before clipping, as the optimizer keeps it (a float, a device
    tensor, or None). In bf16 without ZeRO, DeepSpeed's wrapper around our optimizer computes its
    own norm, which miscounts tensor-parallel shards (it looks for the `tensor_model_parallel`
    mark on gradients, not on parameters); ours counts them right."""
    inner = getattr(engine.optimizer, "optimizer", None)
    return inner._global_grad_norm if isinstance(inner, SkipNonFiniteAdamW) else engine.get_global_grad_norm()


def global_grad_norm(engine) -> float:
    """grad_norm_value read on the host (NaN where the optimizer keeps none)."""
    return as_float(grad_norm_value(engine))


def as_float(value) -> float:
    """A host float of a step's loss or grad norm (a read that waits for the device)."""
    return float("nan") if value is None else float(value)


@dataclasses.dataclass
class Progress:
    """Skipped-step bookkeeping: non-finite steps are skipped; too many in a row stop the run."""

    last_good: str | None
    skipped: int = 0
    bad_in_a_row: int = 0

    def record(self, step: int, loss, grad_norm, applied: bool, max_bad: int, log) -> bool:
        """False if the step was skipped. Raises TrainingError after max_bad in a row.

        The optimizer decides (it skips a step whose gradient norm is not finite, which a
        non-finite loss makes so); loss and norm are read on the host only to report a skip."""
        if applied:
            self.bad_in_a_row = 0
            return True
        self.skipped += 1
        self.bad_in_a_row += 1
        log.text(f"step {step}: non-finite loss {as_float(loss)} / grad norm {as_float(grad_norm)}; step skipped "
                 f"({self.bad_in_a_row} in a row, {self.skipped} in all)")
        if self.bad_in_a_row >= max_bad:
            fix = (f"last good checkpoint: {self.last_good}; resume from it (train.resume={self.last_good}) "
                   "with a lower train.lr" if self.last_good else
                   "no checkpoint was saved yet; restart with a lower train.lr")
            raise TrainingError(f"{self.bad_in_a_row} non-finite steps in a row (limit train.max_bad_steps="
                                f"{max_bad}); {fix}")
        return False


class Meter:
    """Mean loss, tokens/s and MFU over the steps since the last flush.

    Only the time spent in training steps counts (not eval or checkpoint saves).
    """

    def __init__(self, tokens_per_step: int, flops_per_token: float, peak_flops: float):
        self.tokens_per_step, self.flops_per_token, self.peak = tokens_per_step, flops_per_token, peak_flops
        self.loss, self.n, self.seconds = 0.0, 0, 0.0

    def add(self, loss, seconds: float) -> None:
        """loss: a float or a device tensor; it is summed where it is and read at flush."""
        self.loss, self.n, self.seconds = self.loss + loss, self.n + 1, self.seconds + seconds

    def flush(self) -> dict[str, float]:
        tps = self.tokens_per_step * self.n / self.seconds
        out = {"train/loss": as_float(self.loss) / self.n, "train/tokens_per_sec": tps,
               "train/mfu": self.flops_per_token * tps / self.peak}
        self.loss, self.n, self.seconds = 0.0, 0, 0.0
        return out


def run_eval(model, val_ds, seq_len: int, device, mesh: ParallelMesh | None = None) -> dict[str, float]:
    """Whole held-out documents (context / sequence parallelism off, the whole model on every
    pipeline stage), split over every rank but the tensor-parallel peers, which read the same."""
    with whole_sequences(model):
        group = mesh.group("pp_dp_cp") if mesh is not None and mesh.dp * mesh.cp * mesh.pp > 1 else None
        return evaluate(model, val_ds, seq_len, device=device, group=group)


def padded_vocab(n: int) -> int:
    """A tokenizer's vocabulary padded, as Megatron does, so any tp up to 128 divides it."""
    return -(-n // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


def start_processes(cfg: Config) -> tuple[int, int, ParallelMesh, torch.device]:
    """torch.distributed + DeepSpeed, the mesh, threads and device -> (rank, world, mesh, device)."""
    rank, world = setup_distributed(cfg)
    mesh = ParallelMesh.build(cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.cp)
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    return rank, world, mesh, device


def build_model(cfg: Config, mesh: ParallelMesh, device):
    """The model with the layout's plans applied, its pipeline (None unless parallel.pp > 1) and
    the DeepSpeed engine that trains it -> (model, pipe, engine, parameters, FLOPs per token)."""
    torch.manual_seed(cfg.train.seed)
    with torch.device("meta"):  # sizes of the whole model, without its memory
        whole = RecurrentLM(cfg.model)
    n_params, flops_per_token = whole.num_params(), whole.flops_per_token(cfg.data.seq_len)
    # Each rank builds for real only its pipeline stage's pieces, each from its own seed and cut to
    # its tensor-parallel shard (megarnn/parallel/construct.py): every layout starts from the
    # weights one process would, and no rank holds the whole model.
    # ZeRO-3 partitions each piece over the data parallel ranks as soon as it is built.
    partition = zero3_partitioner(cfg, mesh) if cfg.parallel.zero_stage == 3 else None
    model, _, parts = build_local(cfg.model, mesh, cfg.train.seed, cfg.parallel, partition=partition)
    model.checkpoint_every = cfg.parallel.activation_checkpointing
    if mesh.pp == 1:  # under pipeline parallelism DeepSpeed puts this stage's layers on the device
        model.to(device)
    if cfg.train.compile:  # the whole forward as one graph: every op is a custom op (megarnn/ops)
        if mesh.pp > 1 or mesh.cp > 1:
            raise ConfigError("train.compile=true compiles the whole model as one graph; pipeline and context "
                              "parallelism run eagerly: set train.compile=false, or parallel.pp=1 and parallel.cp=1")
        # forward only, not Module.__call__: the engine's forward hooks (DeepSpeed's timers) stay eager
        model.forward = torch.compile(model.forward, fullgraph=True)
    pipe = pipeline_module(model, mesh, cfg.parallel.pp_balance, parts) if mesh.pp > 1 else None
    return model, pipe, build_engine(cfg, pipe or model, mesh), n_params, flops_per_token


def train(cfg: Config) -> dict[str, float]:
    """Run (or resume) training as configured; returns the final validation metrics.

    The preemption signals are caught from the start: one that arrives while the run is still
    setting up (data, model, engine, resume) stops it after its first step, with a checkpoint."""
    with PreemptionWatch() as preemption:
        try:
            return _train(cfg, preemption)
        finally:
            watchdog.stop()


def _train(cfg: Config, preemption: PreemptionWatch) -> dict[str, float]:
    run_dir = Path(cfg.train.out_dir)
    check_schedule(cfg.train)
    if cfg.data.train_files:
        split_files(cfg.data)  # every data path resolves, before anything is written
    check_writable(run_dir)
    resume_from = find_resume(cfg)

    rank, world, mesh, device = start_processes(cfg)
    t = cfg.train

    def data():  # rank 0 tokenizes / checks first; the others then reuse what it wrote
        return build_run_data(cfg.data, run_dir, (cfg.data.seq_len, t.micro_batch_size, t.grad_accum),
                              cfg.data.seed, mesh.rank_in("dp"), mesh.dp)
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        tokenizer, loader, val_ds = data()
    dist.barrier()
    if rank != 0:
        tokenizer, loader, val_ds = data()
    val_size = check_validation(cfg.data, val_ds, loader)
    if cfg.model.vocab_size == 0:
        cfg.model.vocab_size = padded_vocab(tokenizer.vocab_size)
    elif cfg.model.vocab_size < tokenizer.vocab_size:
        raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's "
                          f"{tokenizer.vocab_size}; set model.vocab_size=0 to take the tokenizer's")
    if rank == 0:
        (run_dir / "config.yaml").write_text(cfg.to_yaml())

    model, pipe, engine, n_params, flops_per_token = build_model(cfg, mesh, device)
    step, skipped = 0, 0
    if resume_from is not None:
        client = checkpoint.load(engine, cfg, resume_from, mesh.dp * mesh.cp)
        step, skipped = client["step"], client.get("skipped", 0)
        changes = schedule_changes(client.get("config", {}).get("train", {}), t)
        if changes:  # allowed by check_schedule_on_resume: train.resume_schedule=new
            restart_schedule(engine, cfg)
        if "data" in client:  # the data position: exact also after a change of dp ranks or batch size
            loader.load_state_dict(client["data"])
    log = MetricsLogger(run_dir, rank == 0, t.max_steps, step, t.progress)
    ckpt_dir = run_dir / "checkpoints"
    log.text(f"layout: {mesh.sizes()} (pp x dp x cp x tp)") if world > 1 else None
    peak = peak_flops(t.peak_tflops) * world
    if step == 0:
        log.text(f"model: {n_params / 1e6:.2f}M parameters, {flops_per_token / 1e6:.1f} MFLOPs "
                 f"per token; {world} process(es) on {device.type}")
    else:
        resume_from = Path(client.get("loaded_from", resume_from))  # after a walk-back past a bad one
        log.text(f"resumed from {resume_from} at step {step}")
        if changes:
            log.text(f"LR schedule changed on resume (train.resume_schedule=new): {describe_changes(changes)}; "
                     f"the lr at step {step} is now {engine.lr_scheduler.get_last_lr()[0]:.3g}")
    data_line, epochs = describe_data(loader, cfg.data.seq_len, t.max_steps)
    log.text(data_line)
    if epochs > 1:
        log.text(f"warning: {epochs:.1f} epochs: the run sees its training tokens ~{epochs:.0f} times and may "
                 "memorize them; add data or lower train.max_steps")
    log.text("validation: {:,} documents, {:,} tokens, {:,} characters".format(*val_size) if val_size else
             "validation: none (no data.holdout, data.val_files or data.val_fraction): no held-out numbers")

    end = min(t.max_steps, t.exit_at_step) if t.exit_at_step > 0 else t.max_steps
    progress = Progress(last_good=str(resume_from) if resume_from else None, skipped=skipped)
    meter = Meter(loader.global_batch_size * cfg.data.seq_len, flops_per_token, peak)
    val = None
    watchdog.start(t.hang_timeout, rank, run_dir / "log.txt")  # a rank without progress dumps its stacks, exits
    while step < end:
        watchdog.beat("step", step=step + 1)
        t0 = time.perf_counter()
        loss, grad_norm = train_step(engine, loader, step, t.grad_accum, mesh, device)
        seconds = time.perf_counter() - t0
        step += 1
        if progress.record(step, loss, grad_norm, engine.was_step_applied(), t.max_bad_steps, log):
            meter.add(loss, seconds)
            log.advance(step)
            if step % t.log_interval == 0 or step == end:  # the host reads loss and norm only here
                scalars = {**meter.flush(), "train/lr": engine.get_lr()[0],
                           "train/tokens": step * meter.tokens_per_step,
                           "train/grad_norm": as_float(grad_norm), "train/skipped_steps": progress.skipped,
                           **model.solver_stats()}
                log.scalars(step, scalars)
                log.advance(step, scalars["train/loss"])
            if val_ds is not None and (step % t.eval_interval == 0 or step == end):
                watchdog.beat("eval", slow=True)
                with full_model(model, pipe, mesh, device):
                    val = run_eval(model, val_ds, cfg.data.seq_len, device, mesh)
                log.scalars(step, {"val/loss": val["loss"], "val/bpc": val["bpc"], "val/ppl": val["ppl"]})
        watchdog.beat("stop flag all-reduce")
        stop = preemption.requested()
        if (progress.bad_in_a_row == 0 and (step % t.save_interval == 0 or step == end)) or stop:
            watchdog.beat("save", slow=True)
            client = {"skipped": progress.skipped, "data": loader.state_dict(step),
                      "param_groups": engine.megarnn_param_groups}
            tag = checkpoint.save(engine, cfg, ckpt_dir, step, client, tokenizer, mesh.sizes(), model)
            progress.last_good = str(ckpt_dir / tag)
            log.text(f"saved checkpoint {progress.last_good}")
        if stop:
            log.close()
            raise Preempted(f"stopped by {preemption.signal_name} after step {step}; "
                            f"checkpoint {progress.last_good}; rerun the same command to resume")

    watchdog.beat("final eval and sample", slow=True)
    with full_model(model, pipe, mesh, device):
        if val is None and val_ds is not None:
            val = run_eval(model, val_ds, cfg.data.seq_len, device, mesh)
        if t.sample_tokens > 0 and mesh.rank_in("dp") == 0:  # a tensor-parallel group samples together
            from megarnn.generate import generate
            with whole_sequences(model):
                text = generate(model, tokenizer, t.sample_prompt, t.sample_tokens, seed=t.seed)
            log.text("sample:\n" + text)
    log.close_bar()
    if rank == 0:
        draw_curves(run_dir, log)
    if val is not None:
        log.text(FINAL_LINE.format(val["bpc"]))
    log.close()
    return val or {}
