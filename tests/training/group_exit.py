"""Run by torchrun in a test: joins the process group through attnzoo, then ends, normally or by an uncaught error;
an exit handler registered before attnzoo's (so run after it) prints whether the group still existed at exit."""

import atexit
import sys

import torch.distributed as dist

from attnzoo._distributed import distributed_context

atexit.register(
    lambda: print(
        f"rank {dist.get_rank() if dist.is_initialized() else '-'} group at exit: {dist.is_initialized()}", flush=True
    )
)
ctx = distributed_context()
dist.barrier()
if sys.argv[1:] == ["fail"] and ctx.rank == 1:
    raise RuntimeError("rank 1 fails")
if sys.argv[1:] == ["command-fails"] and ctx.rank == 1:  # as attnzoo's command line ends on an error: an exit status
    from attnzoo.cli import main

    sys.exit(main(["weights", "verify", "/no/such/checkpoint.pth"]))
