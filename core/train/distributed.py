"""Data-parallel training on torch.distributed, started by ``torchrun`` or ``accelerate launch``.

Each process takes its shard of every global batch; after backward the trainable
gradients are averaged across processes (adapters are small, so one all-reduce per
tensor is cheap). Backend: nccl on CUDA, gloo on CPU. One process needs none of it.
"""
import dataclasses
import os

import torch


@dataclasses.dataclass
class World:
    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def sum_int(self, value: int) -> int:
        return int(self._reduce(value, "SUM"))

    def sum_float(self, value: float) -> float:
        return self._reduce(value, "SUM")

    def max_int(self, value: int) -> int:
        return int(self._reduce(value, "MAX"))

    def _reduce(self, value: float, op: str) -> float:
        t = torch.tensor([value], dtype=torch.float64)
        if self.world > 1:
            torch.distributed.all_reduce(t, op=getattr(torch.distributed.ReduceOp, op))
        return float(t.item())

    def broadcast(self, tensors) -> None:
        """Overwrite ``tensors`` in every process with rank 0's values (in place)."""
        if self.world == 1:
            return
        with torch.no_grad():
            for t in tensors:
                torch.distributed.broadcast(t.data, src=0)

    def average_grads(self, params) -> None:
        if self.world == 1:
            return
        for p in params:
            if p.grad is not None:
                torch.distributed.all_reduce(p.grad)
                p.grad /= self.world

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()


def current() -> World:
    """This process's place; initialises the process group under torchrun/accelerate."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return World()
    if not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend)
    return World(torch.distributed.get_rank(), world)


def device_for(requested: str | None) -> str:
    """``--device`` resolved: auto picks this process's GPU under torchrun, else cpu."""
    if requested and requested != "auto":
        return requested
    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return "cpu"
