"""The logged gradient norm under tensor parallelism in bf16 without ZeRO (where DeepSpeed wraps our
optimizer and steps it on fp32 copies) equals the one-process norm."""
import copy

import torch
import torch.multiprocessing as mp

from megarnn.config import ModelConfig
from megarnn.models import RecurrentLM
from megarnn.parallel.launch_env import free_port
from megarnn.parallel.mesh import ParallelMesh
from megarnn.parallel.plan import apply_tensor_parallel
from megarnn.train.engine import build_engine, setup_distributed
from megarnn.train.loop import global_grad_norm
from tests.parallel.spawn_util import run_on_ranks
from tests.parallel.test_pipeline import _config


def _check():
    setup_distributed()
    mesh = ParallelMesh.build(tp=2)
    cfg = _config(0, tp=2)
    cfg.train.precision, cfg.train.grad_accum = "bf16", 1
    torch.manual_seed(0)
    full = RecurrentLM(ModelConfig(vocab_size=64, d_model=16, n_layers=2, n_heads=4, block_pattern="RA"))
    tokens = torch.randint(0, 64, (2, 9))
    ref = copy.deepcopy(full)
    ref.masked_loss(ref(tokens[:, :-1])[0], tokens[:, 1:], torch.ones(2, 8, dtype=torch.bool)).backward()
    want = torch.sqrt(sum(p.grad.pow(2).sum() for p in ref.parameters())).item()
    apply_tensor_parallel(full, mesh.group("tp"))
    engine = build_engine(cfg, full, mesh)
    logits, _ = engine(tokens[:, :-1])
    engine.backward(full.masked_loss(logits.float(), tokens[:, 1:], torch.ones(2, 8, dtype=torch.bool)))
    engine.step()
    got = global_grad_norm(engine)
    assert abs(got - want) <= 0.03 * want, f"tp2 bf16 ZeRO-0 grad norm {got} != one process {want}"


def test_tensor_parallel_bf16_grad_norm_equals_one_process():
    mp.spawn(run_on_ranks, args=(2, free_port(), _check), nprocs=2, join=True)
