"""Running a check on N gloo ranks in spawned processes, with failures reported, not lost.

A rank whose check raises prints the traceback and leaves with os._exit(1) instead of
tearing the process group down while its peers may still wait in a collective (gloo can
abort the process then, hiding the assertion); ranks that succeed meet at a barrier first.
"""
import os
import sys
import traceback

import torch
import torch.distributed as dist


def run_on_ranks(rank: int, world: int, port: int, check, *args) -> None:
    # The variables torchrun would set: DeepSpeed (and its PipelineModule) read them.
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        check(*args)
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    dist.barrier()
    dist.destroy_process_group()
