"""Two training processes (torch.distributed, gloo, on the CPU): a non-finite value on ONE process stops BOTH with the
same NonFiniteError at the same step, before the optimiser step (issue 23 case 16). Before, the bad process exited
alone and the other died in the gradient all-reduce ("Connection closed by peer"; under NCCL it would hang)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]

# One process of the run: rank 1's data holds NaN (latents or prompt embeddings); gradients are averaged over the
# processes as flash-distill does (training/cli/distributed.py), the decision is left to flash_core.run.
PROCESS = textwrap.dedent("""
    import json, sys
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    from flash_core import run
    from flash_core.backends.diffusers import UNetDenoiser
    from flash_core.batches import TensorDataset
    from flash_core.denoiser import Conditioning
    from flash_core.distill import FlashDistiller
    from tests.flash_core.test_backends import TEXT_DIM, tiny_config, tiny_sd15_unet

    def average(parameters):
        for param in parameters:
            if param.grad is None:
                param.grad = torch.zeros_like(param)
            dist.all_reduce(param.grad)
            param.grad /= world

    g = torch.Generator().manual_seed(0)
    latents, cond = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 5, TEXT_DIM, generator=g)
    uncond = torch.randn(1, 5, TEXT_DIM, generator=g)
    if rank == 1:
        {"latents": latents, "prompts": cond}[sys.argv[1]][:] = float("nan")
    dataset = TensorDataset(latents, Conditioning(cond), Conditioning(uncond))
    distiller = FlashDistiller(UNetDenoiser(tiny_sd15_unet()), tiny_config("sd15", total_steps=4, batch_size=2, lr=1e-3),
                               process_index=rank, reduce_gradients=average)
    trainer = run.Run(distiller, dataset, process_index=rank, num_processes=world)
    try:
        trainer.train()
        print(json.dumps({"rank": rank, "result": "done"}), flush=True)
    except run.NonFiniteError as error:
        print(json.dumps({"rank": rank, "error": str(error), "step": error.step, "lora_step": distiller.step}), flush=True)
""")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow  # two processes: make test, not test-fast
@pytest.mark.parametrize("bad, what", [("latents", "the training latents"), ("prompts", "the prompt embeddings")])
def test_a_non_finite_value_on_one_process_stops_every_process_with_the_same_error(bad, what):
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2",
           "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    processes = [subprocess.Popen([sys.executable, "-c", PROCESS, bad], cwd=REPO_ROOT, env={**env, "RANK": str(rank)},
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    outputs = []
    try:
        for process in processes:
            stdout, stderr = process.communicate(timeout=240)  # a process left waiting in a collective would hang
            lines = [line for line in stdout.splitlines() if line.startswith("{")]
            assert process.returncode == 0 and lines, stderr[-3000:]
            outputs.append(json.loads(lines[-1]))
    finally:
        for process in processes:
            process.kill()
    first, second = outputs
    assert "error" in first and "error" in second, outputs  # both stopped, neither died in the all-reduce
    assert first["error"] == second["error"] and first["step"] == second["step"] == 1
    assert what in first["error"] and "Nothing of step 1 was applied" in first["error"]
    assert first["lora_step"] == second["lora_step"] == 0  # stopped before the optimiser step, on both
