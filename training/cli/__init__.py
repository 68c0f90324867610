"""flash-distill: distil a Flash Diffusion LoRA student from a diffusers teacher, headless, on accelerate.

    flash-distill --config training/configs/sd15.yaml            # one process (GPU if there is one)
    flash-distill --config training/configs/sd15.yaml --resume   # continue from the latest checkpoint
    flash-distill cache-targets --config training/configs/sd15.yaml [--verify N]   # teacher targets, once
    flash-distill --config training/configs/sd15.yaml --target-cache DIR           # train on them
    accelerate launch --multi_gpu --num_processes 4 -m training.cli --config training/configs/sdxl.yaml
    accelerate launch --multi_gpu --num_machines 2 --machine_rank R --main_process_ip IP --main_process_port 29500 \\
        --num_processes 16 -m training.cli --config ...           # multi-node (output_dir on a shared disk)

Without a GPU, `accelerate launch --multi_gpu --num_processes 2 -m training.cli ...` runs two CPU processes
over gloo (the tests do this). Data parallel is DDP-style: every rank holds the frozen teacher and the same
LoRA, draws its own slice of each global batch and its own noise; gradients of the trainable parameters
(LoRA, discriminator head) are averaged across ranks before each optimiser step (`GradientAverager`), so
every rank applies the identical update. Ctrl-C (SIGINT) or SIGTERM on any rank: all ranks finish the
step, save a checkpoint and exit 130 (under `accelerate launch`, torchrun forwards the signal and waits
30 s before killing). Multi-node: `output_dir` must be on a filesystem every node sees. 
FSDP / DeepSpeed: not used, and refused at start with a clear message. The trainable part is small (LoRA +
discriminator head, <= 110M parameters) and the frozen network is shared by teacher and student, so there is
nothing worth sharding; data parallel is what the paper used. For memory on big teachers use
`mixed_precision: bf16` (the frozen network is then held in bf16) and `distill: {grad_checkpointing: true}`.

The config is YAML (training/configs/*.yaml documents every key). Errors in it, a missing model folder or
an empty / corrupt dataset stop the run at once with exit code 2 and one line naming the key or file; so does
`--resume` from a checkpoint made with other settings, another teacher or other data (the line lists every
difference; `--allow-changes` continues anyway). A non-finite loss, gradient or training latent stops the run
before the optimiser step with one line naming the step and the likely cause, exit code 3; the checkpoints
already written are kept and nothing is exported.

Target cache (flash_core.target_cache): `flash-distill cache-targets` solves the teacher targets of every student
update of the run the config describes (for `--processes N` processes) in large no-grad batches
(`--teacher-batch`; default from the free GPU memory) into the folder `target_cache` (config key or
`--target-cache`; default output_dir/target-cache). A killed build is finished by running it again; `--verify N`
re-solves N random batches and compares (exit 5 on a mismatch). Training with `--target-cache DIR` (or the
config key) reads the targets instead of solving; a cache of other settings / teacher / data refuses with every
difference (exit 2). The targets do not depend on the student: other lr, rank or loss weights share a cache.

The loop, batch order, checkpoint format, preview rule and export are flash_core.run's (the ComfyUI node
drives the same run). Outputs under `output_dir`:
    config.yaml                      the resolved config of the run
    cache/latents-<hash>.safetensors the dataset, VAE- and text-encoded once
    checkpoints/step-000500/         flash_core.run checkpoint: state.flashckpt (settings, fingerprints, trainer incl.
                                     optimisers and discriminator, step log), rank-<r>.flashckpt (RNG), meta.json
    losses.jsonl                     one JSON line of losses every `log_every` steps
    samples/step-000500.png          rows teacher | student 1 | 2 | 4 steps, one column per sample prompt
    export/<name>_comfyui.safetensors  ComfyUI-native LoRA (kohya keys; SD3 / PixArt: transformer.*): copy into ComfyUI/models/loras
    export/diffusers/pytorch_lora_weights.safetensors  diffusers load_lora_weights format (not for pixart)
    export/peft/adapter_model.safetensors + adapter_config.json  PEFT format
"""

from training.cli.main import main

__all__ = ["main"]
