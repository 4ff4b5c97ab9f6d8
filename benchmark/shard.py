"""Sharded runs under ``accelerate launch``: every process measures its share of the batches, and
the rows are gathered so that the main process writes the one raw.csv a single process would.

    accelerate launch --multi_gpu --num_processes 4 eval_dolly.py --dataset_path ... --out results/x
    accelerate launch --multi_gpu --num_processes 2 eval_dolly.py --device cpu ...   # CPU processes, gloo

Outside ``accelerate launch`` (or torchrun, or mpirun) a run is one process and nothing changes.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Shard:
    rank: int = 0        # this process (accelerate's process_index); 0 is the main process
    size: int = 1        # processes in the run

    @classmethod
    def launched(cls, args) -> Shard:
        """This process's place in the launch. On the CPU (``--device cpu``, or auto without CUDA) the
        processes talk over gloo; on GPUs each process takes the GPU of its local rank (``args.device``
        becomes it). A model split over devices (``--device_map``) takes one process."""
        from accelerate import PartialState

        from sampling.app.models import resolve_device
        state = PartialState(cpu=resolve_device(args.device).type == "cpu")
        shard = cls(state.process_index, state.num_processes)
        if shard.size > 1:
            if getattr(args, "device_map", None) is not None:
                raise ValueError(f"--device_map with {shard.size} processes: a split model takes every device "
                                 f"of one process; launch one process")
            if state.device.type == "cuda":
                args.device = str(state.device)
        return shard

    @property
    def main(self) -> bool:
        return self.rank == 0

    def mine(self, items: list) -> list:
        """This process's share of items: every size-th from its rank (round robin, so that sorted
        batches, short to long, are dealt evenly)."""
        return items[self.rank::self.size]

    def gather(self, obj: list) -> list:
        """Every process's list, concatenated in rank order, on every process."""
        if self.size == 1:
            return obj
        from accelerate.utils import gather_object
        return gather_object(obj)

    def agree(self, value):
        """The main process's value, on every process (a seed drawn at random, say)."""
        if self.size == 1:
            return value
        from accelerate.utils import broadcast_object_list
        return broadcast_object_list([value], from_process=0)[0]

    def wait(self) -> None:
        """A barrier: every process gets here before any goes on."""
        if self.size > 1:
            from accelerate import PartialState
            PartialState().wait_for_everyone()

    def close(self) -> None:
        """The end of a launched run, in every process: wait for the others, then leave the process
        group (a process that exits with the group alive can abort, "terminate called without an
        active exception", and fail the launch)."""
        if self.size > 1:
            import torch.distributed as dist
            self.wait()
            if dist.is_initialized():
                dist.destroy_process_group()
