"""Data parallel under accelerate: gradient averaging across processes and decisions every rank agrees on."""

from __future__ import annotations

# --------------------------------------------------------------------------------------------------
# Data parallel: average the trainable parameters' gradients across processes before each optimiser step
# --------------------------------------------------------------------------------------------------


class GradientAverager:
    """`reduce_gradients` for FlashDistiller under accelerate: all-reduce (mean) the `.grad` of the given
    trainable parameters (LoRA, or the discriminator head) across processes before each optimiser step, so
    every rank takes the same step. (The trainer calls the same network as teacher, student, feature encoder
    and fake score within one step, so it is not wrapped in DDP; see flash_core/distill.py.)
    """

    def __init__(self, accelerator):
        self.accelerator = accelerator

    def __call__(self, parameters) -> None:
        import torch
        import torch.distributed as dist

        world = self.accelerator.num_processes
        if world == 1:
            return
        parameters = list(parameters)
        present = torch.tensor([p.grad is not None for p in parameters], dtype=torch.uint8, device=self.accelerator.device)
        dist.all_reduce(present, op=dist.ReduceOp.MAX)  # the same set of grads on every rank (no hang)
        grads = []
        for param, has_grad in zip(parameters, present.tolist()):
            if has_grad:
                if param.grad is None:
                    param.grad = torch.zeros_like(param)
                grads.append(param.grad)
        if not grads:
            return
        flat = torch.cat([g.reshape(-1).float() for g in grads])  # one bucket, one all-reduce
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= world  # mean gradient over ranks
        offset = 0
        for grad in grads:
            grad.copy_(flat[offset : offset + grad.numel()].view_as(grad))
            offset += grad.numel()


def any_rank(accelerator, flag: bool) -> bool:
    """True on every rank if `flag` is true on any rank (so all ranks stop at the same step)."""
    if accelerator.num_processes == 1:
        return flag
    import torch
    import torch.distributed as dist

    value = torch.tensor([1 if flag else 0], device=accelerator.device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())
