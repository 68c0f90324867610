"""Flash Diffusion training: one optimiser step of the student (and of the discriminator) and the loop state.

Public API (used by training/cli/, training/digits/ and the ComfyUI training node):

    DistillConfig(backbone="sd15", total_steps=10_000, ...)             # flash_core.distill_config; None = recipe's
        .recipe() -> Recipe                                              # recipe with overrides applied
    Batch(latents, cond, uncond)                                         # uncond may have batch size 1
    teacher_target(denoiser, z_t, grid_index, cond, uncond, guidance, grid_steps, student_steps=None) -> x0
                                                                         # DPM-Solver++ / flow Euler
    guided_output(denoiser, x_t, t, cond, uncond, guidance) -> raw       # CFG: w*out_c + (1-w)*out_u
                                                                         # guidance: float or one per sample
    TargetInputs(grid_index, guidance, noise)                            # the draws that define a target
    target_inputs(config, step, process_index, latent_shape) -> TargetInputs    # counter-based, any step
    student_updates(config) -> list[int]                                 # iterations that update the student
    training_grid(denoiser, grid_steps, student_steps=None) -> list[float]   # K-step grid in model timesteps
    FlashDistiller(denoiser, config, device=None, backward=None, process_index=0, reduce_gradients=None)
        .step: int                .phase -> int            .recipe: Recipe
        .student_params: list[Parameter]     .discriminator: DiscriminatorHead
        .student_optimizer / .discriminator_optimizer: AdamW
        .sample_grid_index(phase=None, generator=None) -> int           # the timestep-mixture sampler
        .target_inputs(step, latent_shape) -> TargetInputs              # this process's draws of `step`
        .target_cache: TargetCache | None   # set by run.Run: targets read from flash_core.target_cache
        .student_x0(z_t, t, cond, negative=None, guidance=None) -> Tensor   # LCM-boundary student output
                                                      # (guidance mode "cfg": of the student's own CFG)
        .distribution_matching_loss(x, cond, uncond) -> Tensor          # DMD loss of a student sample
        .train_step(batch) -> dict[str, float]        # one iteration: the student, then the discriminator, update
                                                      # (or alternating), losses, student_update / discriminator_update
                                                      # flags, seconds: teacher_s, student_s, discriminator_s, dmd_s
        .student_sample(noise, cond, num_steps=4, generator=None, negative=None, guidance=None, renoise=None)
                                                      # LoRA merged; CFG with negative; sampling.renoise_rule
        .state_dict() -> dict / .load_state_dict(d)                     # exact resume
        .lora_state_dict() -> dict[str, Tensor]                         # peft-named student LoRA (the EMA's if on)
        .averaged_lora()                                  # context: the EMA weights in the LoRA (lora_average)

Around it: flash_core.recipes, flash_core.denoiser (Conditioning, the Denoiser ABC, the noise algebra),
flash_core.losses, flash_core.lora_average (EMA) and flash_core.backends.diffusers (the Denoisers of diffusers models).

The recipe as implemented: `step` / `total_steps` count iterations = batches. As in the reference, every batch runs
both optimisers, the student's step and then the discriminator's on the same batch (Lightning counts each as a step,
hence the paper's "20k steps" = 10k batches = 10k student updates); on the digits benchmark it gives a better
student than alternating batches (docs/architecture.md). alternate_updates=True keeps the older order (even
iterations update the student, odd ones the head, on different batches). The four phases split the iterations. Every
sample of a batch draws its own adversarial re-noising level (t in {10, 250, 500, 750}) and its own DMD timestep;
the student's grid index and the teacher guidance w are drawn once per batch (w: per sample in guidance mode "cfg").

Guidance modes (DistillConfig.guidance_mode). "baked" (the paper's): the student s(x, c) is one model call and
learns the teacher's CFG output at the batch's w. "cfg" (CFG-aware): the student's output is its own CFG, w*s(x,
positive) + (1-w)*s(x, negative) (two calls, one batched forward), with a w and a prompt pair per sample
(draws.sample_guidance; draws.guidance_pair: the own or the empty prompt as positive, the empty or another sample's
prompt as negative); the teacher target, the DMD scores (real: teacher CFG, fake: student CFG, same w and pair) and
the discriminator's condition (the positive) use the same pair, and its real sample is the teacher's guided target
(a dataset image knows neither w nor the negative), so at sampling cfg and the negative act as on the teacher. The
student's CFG error grows with w, so its distillation error is measured in units of w (l2: divided by w^2, every w
weighs alike; on the digits model the student without it followed the teacher at large w only).

Randomness is counter-based (flash_core.draws); the teacher's grid and solve are flash_core.teacher_solve.

Mixed precision ("bf16", as accelerate / Lightning "bf16-mixed"): frozen weights may be bf16, the forward
passes run under bf16 autocast, and everything trainable (LoRA adapters, discriminator head) and so the AdamW
state is float32; FlashDistiller refuses trainable parameters of another dtype.

accelerate / DDP: pass `backward=accelerator.backward`, `process_index=accelerator.process_index` (distinct
noise per process) and `reduce_gradients=` a callable that all-reduces (averages) the `.grad` of the given
parameters — the student runs through the plain network (teacher and student share it), so gradients of
`student_params` and of the discriminator head are synchronised explicitly, not by a DDP wrapper.
Optimisers may be wrapped with `accelerator.prepare`. Defaults: single process, `loss.backward()`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from flash_core import lora_average, sampling
from flash_core.denoiser import (
    Conditioning,
    Denoiser,
    add_noise,
    noise_coefficients,
    output_to_x0_eps,
)
from flash_core.distill_config import MIXED_PRECISION, DistillConfig  # noqa: F401  (re-exported)
from flash_core.draws import (  # noqa: F401  (re-exported: the trainer's public API names them)
    REST_STREAM,
    TARGET_STREAM,
    TargetInputs,
    guidance_pair,
    phase_mixture_probs,
    sample_grid_index,
    sample_guidance,
    step_generator,
    stream_seed,
    student_input,
    student_updates,
    target_inputs,
)
from flash_core.losses import (
    DiscriminatorHead,
    discriminator_loss,
    distillation_loss,
    dmd_gradient,
    dmd_loss,
    generator_adversarial_loss,
)
from flash_core.recipes import Recipe
from flash_core.schedules import (
    NUM_TRAIN_TIMESTEPS,
    flow_sigmas,
    phase_of_step,
    trailing_timesteps,
)
from flash_core.teacher_solve import guided_output, teacher_target, training_grid
from flash_core.trainer_state import load_trainer_state, trainer_state


@dataclass
class Batch:
    """One training batch: VAE latents of real images and their (un)conditional embeddings."""

    latents: Tensor
    cond: Conditioning
    uncond: Conditioning


# ---- trainer --------------------------------------------------------------------------------------
class FlashDistiller:
    """Flash Diffusion trainer: student = denoiser + LoRA, teacher = same network with LoRA disabled."""

    def __init__(
        self,
        denoiser: Denoiser,
        config: DistillConfig,
        device: torch.device | str | None = None,
        backward: Callable[[Tensor], None] | None = None,
        process_index: int = 0,
        reduce_gradients: Callable[[list[nn.Parameter]], None] | None = None,
        recipe: Recipe | None = None,
    ):
        self.denoiser = denoiser
        self.config = config
        self.recipe = recipe if recipe is not None else config.recipe()  # resolved once (TrainingSession passes its own)
        self.device = torch.device(device) if device is not None else next(denoiser.lora_module.parameters()).device
        self.backward = backward if backward is not None else (lambda loss: loss.backward())
        # Multi-process: average the grads of these params across processes before each optimiser step
        # (the student runs through the unwrapped network, so DDP cannot do it); None = single process.
        self.reduce_gradients = reduce_gradients
        self.step = 0

        if not denoiser.has_lora:
            denoiser.add_lora(self.recipe.lora_rank, self.recipe.lora_alpha, self.recipe.lora_targets, seed=config.seed,
                              init=self.recipe.lora_init)
        denoiser.lora_module.to(self.device)
        denoiser.set_gradient_checkpointing(config.grad_checkpointing)
        self.student_params: list[nn.Parameter] = denoiser.lora_parameters()
        # The EMA of the LoRA (flash_core.lora_average; None: ema_decay 0), starting from its initial weights.
        self.ema_lora: dict[str, Tensor] | None = lora_average.initial_average(denoiser) if config.ema_decay else None

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed + 1)  # reproducible discriminator head init
            self.discriminator = DiscriminatorHead(
                self.recipe.discriminator_head, denoiser.encoder_feature_channels
            ).to(self.device)
        self._check_float32_trainables()
        self.student_optimizer = torch.optim.AdamW(self.student_params, lr=self.recipe.lr)
        self.discriminator_optimizer = torch.optim.AdamW(self.discriminator.parameters(), lr=self.recipe.lr)

        # Training randomness is counter-based (see the module docstring): target_inputs(step) for the target's
        # draws; the "rest" stream (small draws on the CPU, noise on the device) is re-seeded at every step.
        self.process_index = process_index
        self._seed_rest_stream(0)
        # Teacher targets read from a precomputed cache instead of solved (run.Run sets it after its checks).
        self.target_cache = None
        self.grid = training_grid(denoiser, self.recipe.teacher_grid_steps, self.recipe.student_steps)
        self.guided_student = config.guidance_mode == "cfg"  # the student's output is its own CFG
        self._mixture_probs: dict[int, Tensor] = {}
        # The latest losses of each side, reported on the other side's iterations (and kept by checkpoints).
        self._student_logs: dict[str, float] = {}
        self._discriminator_logs: dict[str, float] = {}

    def _check_float32_trainables(self) -> None:
        """Refuse trainable parameters that are not float32 (their AdamW updates would round away in bf16)."""
        trainables = [(f"LoRA {n}", p) for n, p in self.denoiser.named_lora_parameters()]
        trainables += [(f"discriminator {n}", p) for n, p in self.discriminator.named_parameters()]
        wrong = [(name, p.dtype) for name, p in trainables if p.dtype != torch.float32]
        if wrong:
            name, dtype = wrong[0]
            raise TypeError(
                f"FlashDistiller: {len(wrong)} trainable parameters are not float32 (e.g. {name}: {dtype}). Mixed "
                "precision keeps only the frozen weights in bf16; LoRA adapters and the discriminator head must "
                "be float32 or Adam's small updates vanish. Add the LoRA with Denoiser.add_lora (float32 "
                "adapters) or cast the adapters with .float() before training."
            )

    # ---- sampling of the training randomness ----
    @property
    def phase(self) -> int:
        return phase_of_step(self.step, self.config.total_steps, self.recipe.num_phases)

    def mixture_probs(self, phase: int | None = None) -> Tensor:
        """p(grid index) of `phase` (default: the current one) on the K grid."""
        phase = self.phase if phase is None else phase
        if phase not in self._mixture_probs:
            self._mixture_probs[phase] = phase_mixture_probs(self.recipe, phase)
        return self._mixture_probs[phase]

    def sample_grid_index(self, phase: int | None = None, generator: torch.Generator | None = None) -> int:
        """One K-grid index per batch from the phase's timestep mixture (default generator: the rest stream)."""
        return sample_grid_index(self.mixture_probs(phase), generator if generator is not None else self.cpu_generator)

    def target_inputs(self, step: int, latent_shape) -> TargetInputs:
        """This process's target-defining draws of iteration `step` (flash_core.distill.target_inputs)."""
        return target_inputs(self.config, step, self.process_index, latent_shape, self.sample_grid_index, self.recipe)

    def _seed_rest_stream(self, step: int) -> None:
        """Fresh generators of the "rest" stream of iteration `step`: adversarial t and noise, DMD draws."""
        seed = self.config.seed
        self.cpu_generator = step_generator(seed, self.process_index, step, REST_STREAM)
        self.noise_generator = step_generator(seed, self.process_index, step, REST_STREAM + "-noise", self.device)

    def _uniform(self, low: float, high: float) -> float:
        return low + (high - low) * float(torch.rand((), generator=self.cpu_generator, dtype=torch.float64))

    def _choices(self, values, size: int) -> Tensor:
        """One of `values` per sample (model timesteps, float, on the device)."""
        picks = torch.randint(len(values), (size,), generator=self.cpu_generator)
        return torch.tensor([float(v) for v in values])[picks].to(self.device)

    def _noise(self, like: Tensor) -> Tensor:
        return torch.randn(like.shape, generator=self.noise_generator, device=self.device, dtype=torch.float32)

    def _autocast(self):
        enabled = self.config.mixed_precision == "bf16"
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=enabled)

    def _sync(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def _timestep(self, value: float, batch: int) -> Tensor:
        return torch.full((batch,), float(value), device=self.device)

    # ---- the student ----
    def student_x0(self, z_t: Tensor, t: Tensor, cond: Conditioning, negative: Conditioning | None = None,
                   guidance: float | Tensor | None = None) -> Tensor:
        """Student output x = c_skip(t) z_t + c_out(t) x0_pred (LCM boundary; flow models: x0 = x_t - sigma v);
        with a `negative`, x0_pred of the student's CFG at `guidance` (guidance mode "cfg")."""
        with self._autocast():
            if negative is None:
                raw = self.denoiser.predict(z_t, t, cond)
            else:
                raw = guided_output(self.denoiser, z_t, t, cond, negative, guidance)  # w*s_pos + (1-w)*s_neg
        x0_pred, _ = output_to_x0_eps(self.denoiser, raw.float(), z_t, t)
        if self.denoiser.is_flow:
            return x0_pred  # the SD3 sampler (flash_core.sampling.sample_flow) uses x0 = x - sigma v as is
        return sampling.lcm_boundary_x0(x0_pred, z_t, t)  # x = c_skip z_t + c_out x0_pred

    # ---- one iteration ----
    def train_step(self, batch: Batch) -> dict[str, float]:
        """One training iteration; `step` counts iterations (= batches; the paper's 10k, which Lightning counts as "20k steps").

        By default both update on every iteration, the student first (the reference's order); with
        alternate_updates even iterations update the student, odd iterations the discriminator head.
        Logs (all floats): student_update / discriminator_update (1.0 if that side was updated now);
        loss, loss_distill, guidance (+ loss_adversarial, loss_dmd where weighted > 0) from the student's
        latest update and loss_discriminator from the head's latest update, so a discriminator iteration
        repeats the student's last losses (filter on student_update for one value per update); a side's keys
        are absent only before its first update (loss_discriminator on iteration 0);
        phase; grid_index (of this iteration's student input: trained on, or the fake sample's);
        seconds: teacher_s = the teacher's multi-step CFG solve (with a target cache: reading the target);
        student_s = student forward, adversarial generator pass through the frozen encoder, backward and
        optimiser step; dmd_s = the DMD scores
        (teacher CFG + student, no grad); discriminator_s = the head's LSGAN step (with the student's no-grad
        fake sample on a discriminator iteration). A non-finite student loss stops with FloatingPointError.
        """
        den, phase = self.denoiser, self.phase
        alternate = self.config.alternate_updates
        update_student = not alternate or self.step % 2 == 0
        update_discriminator = not alternate or self.step % 2 == 1
        latents = batch.latents.to(self.device, torch.float32)
        size = latents.shape[0]
        cond = batch.cond.to(self.device)
        uncond = batch.uncond.to(self.device).expand_to(size)
        timings = {"teacher_s": 0.0, "student_s": 0.0, "dmd_s": 0.0, "discriminator_s": 0.0}

        # 1. Student input on the K grid (one grid index and one w per batch); index 0 = pure Gaussian noise.
        inputs = self.target_inputs(self.step, latents.shape)
        self._seed_rest_stream(self.step)
        grid_index = inputs.grid_index
        z_t, t = student_input(den, self.grid, latents, inputs)
        positive, negative = guidance_pair(inputs, cond, uncond)  # baked: the batch's prompts and the empty prompt
        student_negative = negative if self.guided_student else None
        # 2. Adversarial re-noising, per sample: t in {10, 250, 500, 750} (flow: sigma = t/1000), the SAME
        #    noise for real and fake.
        t_adv = self._choices(self.recipe.adversarial_timesteps, size)
        adv_noise = self._noise(latents)

        # 3. The student's update, or (discriminator iteration) its fake sample without gradient.
        fake_features = None
        if update_student:
            x, fake_features, x0_teacher = self._student_update(z_t, t, inputs, positive, negative, phase, t_adv,
                                                                adv_noise, timings)
        else:  # (alternate_updates; DistillConfig refuses it with guidance mode "cfg")
            start = self._sync()
            with torch.no_grad():
                x = self.student_x0(z_t, t, positive, student_negative, sample_guidance(inputs, size))
            timings["discriminator_s"] += self._sync() - start

        # 4. The discriminator head's LSGAN update: real vs the student's x0. Real: the dataset latents ("baked");
        #    "cfg": the teacher's guided target, so the head compares guided outputs at the same w and prompt pair
        #    (dataset images know neither w nor the negative prompt).
        if update_discriminator:
            start = self._sync()
            real = x0_teacher if self.guided_student else latents
            loss_disc = self._discriminator_step(real, x.detach(), fake_features, adv_noise, t_adv, positive)
            self._discriminator_logs = {"loss_discriminator": loss_disc}
            timings["discriminator_s"] += self._sync() - start

        self.step += 1
        return {
            **self._student_logs, **self._discriminator_logs,
            "student_update": float(update_student), "discriminator_update": float(update_discriminator),
            "phase": float(phase), "grid_index": float(grid_index), **timings,
        }

    def _student_update(
        self, z_t: Tensor, t: Tensor, inputs: TargetInputs, cond: Conditioning, uncond: Conditioning,
        phase: int, t_adv: Tensor, adv_noise: Tensor, timings: dict[str, float],
    ) -> tuple[Tensor, Tensor | None, Tensor]:
        """Teacher target (solved, or read from the target cache), the weighted losses, one AdamW step of the
        LoRA. `cond` / `uncond`: each sample's positive and negative (draws.guidance_pair). Returns x, its
        encoder features and the teacher target."""
        den, recipe = self.denoiser, self.recipe
        w_distill, w_adv, w_dmd = recipe.distill_weights[phase], recipe.adversarial_weights[phase], recipe.dmd_weights[phase]
        per_sample = sample_guidance(inputs, z_t.shape[0])  # w ~ U[min, max]: once per batch ("cfg": per sample)
        guidance = per_sample if self.guided_student else inputs.guidance

        start = self._sync()
        if self.target_cache is not None:
            x0_teacher = self.target_cache.target(self.step, self.process_index, inputs, z_t.shape).to(self.device)
        else:
            with torch.no_grad(), den.teacher(), self._autocast():
                x0_teacher = teacher_target(den, z_t, inputs.grid_index, cond, uncond, per_sample,
                                            recipe.teacher_grid_steps, recipe.student_steps)
        timings["teacher_s"] += self._sync() - start

        start = self._sync()
        x = self.student_x0(z_t, t, cond, uncond if self.guided_student else None, guidance)
        if self.guided_student:  # the error of w*s_pos + (1-w)*s_neg grows with w: measured in units of w (l2: 1/w^2)
            w = per_sample.to(self.device, torch.float32).reshape(-1, *([1] * (x.ndim - 1)))
            loss_distill = distillation_loss(x / w, x0_teacher.float() / w, self.config.distill_loss)
        else:
            loss_distill = distillation_loss(x, x0_teacher.float(), self.config.distill_loss)
        total = w_distill * loss_distill
        logs: dict[str, float] = {"guidance": float(per_sample.mean()) if self.guided_student else inputs.guidance}
        fake_features = None
        if w_adv > 0:
            with den.teacher(), self._autocast():  # frozen teacher encoder; grads flow to x only
                fake_features = den.encoder_features(add_noise(den, x, adv_noise, t_adv), t_adv, cond)
            loss_adv = generator_adversarial_loss(self.discriminator(fake_features))
            total = total + w_adv * loss_adv
            logs["loss_adversarial"] = float(loss_adv.detach())
            fake_features = fake_features.detach()
        timings["student_s"] += self._sync() - start

        if w_dmd > 0:
            start = self._sync()
            loss_dmd = self.distribution_matching_loss(x, cond, uncond, guidance if self.guided_student else None)
            total = total + w_dmd * loss_dmd
            logs["loss_dmd"] = float(loss_dmd.detach())
            timings["dmd_s"] += self._sync() - start

        logs.update(loss=float(total.detach()), loss_distill=float(loss_distill.detach()))
        if not torch.isfinite(total.detach()):
            if self.reduce_gradients is None:
                raise FloatingPointError(
                    f"FlashDistiller: the student's loss is not finite at iteration {self.step} (phase {phase}): "
                    f"{ {k: v for k, v in logs.items() if k.startswith('loss')} }. Lower the learning rate, or train "
                    "with mixed_precision 'no' to rule out bf16 overflow; the LoRA was not updated."
                )
            # Multi-process: stopping here alone would leave the other processes waiting in the gradient all-reduce.
            # NaN gradients go through it instead, and the run's guard (flash_core.run) stops every process together.
            total = total * float("nan")

        start = self._sync()
        self.student_optimizer.zero_grad(set_to_none=True)
        self.backward(total)
        if self.reduce_gradients is not None:
            self.reduce_gradients(self.student_params)
        self.student_optimizer.step()
        if self.ema_lora is not None:
            lora_average.update_average(self.ema_lora, self.denoiser, self.config.ema_decay, self.step)
        self.student_optimizer.zero_grad(set_to_none=True)
        self.discriminator.zero_grad(set_to_none=True)  # the generator pass also reached the head
        timings["student_s"] += self._sync() - start
        self._student_logs = logs
        return x, fake_features, x0_teacher.float()

    def averaged_lora(self) -> contextlib.AbstractContextManager:
        """Context: the LoRA holds its EMA (lora_average.swapped_in); without EMA the LoRA as trained."""
        return lora_average.swapped_in(self.denoiser, self.ema_lora)

    def distribution_matching_loss(self, x: Tensor, cond: Conditioning, uncond: Conditioning,
                                   student_guidance: float | Tensor | None = None) -> Tensor:
        """DMD: re-noise x at t ~ U{0..999} per sample; real score = CFG teacher, fake = the student (cond, no grad).
        `student_guidance` (guidance mode "cfg"): both scores are CFG at that w (fake: the student's own CFG)."""
        den, size = self.denoiser, x.shape[0]
        uncond = uncond.expand_to(size)
        t_dmd = torch.randint(NUM_TRAIN_TIMESTEPS, (size,), generator=self.cpu_generator).float().to(self.device)
        x_noisy = add_noise(den, x.detach(), self._noise(x), t_dmd)  # re-noised student sample
        if student_guidance is None:
            guidance = self._uniform(*self.recipe.guidance_range)  # fresh w for the real score, once per batch
        else:
            guidance = student_guidance  # the w the sample was generated at
        with torch.no_grad():
            with den.teacher(), self._autocast():
                raw_real = guided_output(den, x_noisy, t_dmd, cond, uncond, guidance)
            with self._autocast():
                if student_guidance is None:
                    raw_fake = den.predict(x_noisy, t_dmd, cond)
                else:
                    raw_fake = guided_output(den, x_noisy, t_dmd, cond, uncond, guidance)
        x0_real, eps_real = output_to_x0_eps(den, raw_real.float(), x_noisy, t_dmd)
        _, eps_fake = output_to_x0_eps(den, raw_fake.float(), x_noisy, t_dmd)
        alpha, sigma = noise_coefficients(den, t_dmd, x.ndim)
        grad = dmd_gradient(x, x0_real, eps_real, eps_fake, alpha, sigma)
        return dmd_loss(x, grad)

    def _discriminator_step(
        self, real_x0: Tensor, fake_x0: Tensor, fake_features: Tensor | None, noise: Tensor, t: Tensor,
        cond: Conditioning,
    ) -> float:
        """LSGAN step of the head: real x0 (dataset latents, or the teacher's guided target in guidance mode "cfg")
        vs the student's x0, same noise and t (per sample)."""
        den = self.denoiser
        with torch.no_grad(), den.teacher(), self._autocast():
            real_features = den.encoder_features(add_noise(den, real_x0, noise, t), t, cond)
            if fake_features is None:
                fake_features = den.encoder_features(add_noise(den, fake_x0, noise, t), t, cond)
        logits = self.discriminator(torch.cat([real_features, fake_features]).float())
        real_logits, fake_logits = logits.chunk(2)
        loss = discriminator_loss(real_logits, fake_logits)
        self.discriminator_optimizer.zero_grad(set_to_none=True)
        self.backward(loss)
        if self.reduce_gradients is not None:
            self.reduce_gradients(list(self.discriminator.parameters()))
        self.discriminator_optimizer.step()
        self.discriminator_optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    # ---- sampling ----
    @torch.no_grad()
    def student_sample(
        self, noise: Tensor, cond: Conditioning, num_steps: int = 4, generator: torch.Generator | None = None,
        negative: Conditioning | None = None, guidance: float = 1.0, renoise: str | None = None,
    ) -> Tensor:
        """Few-step latents from the student (flash_core.sampling's loop on the training grid); with a
        `negative`, each step is the CFG w*s(x, cond) + (1-w)*s(x, negative) at w = `guidance` (two calls).
        renoise: "fresh" or "deterministic"; None = the rule of the student's guidance mode (sampling.renoise_rule).

        The LoRA (its EMA when ema_decay > 0) is merged into the weights for the duration (Denoiser.merged_lora): no
        per-call adapter cost, the weights restored exactly afterwards.
        """
        den = self.denoiser
        cond = cond.to(self.device)
        negative = negative.to(self.device).expand_to(cond.batch_size) if negative is not None else None

        def model_fn(x: Tensor, t) -> Tensor:
            with self._autocast():
                if negative is None:
                    return den.predict(x, self._timestep(t, x.shape[0]), cond).float()
                return guided_output(den, x, self._timestep(t, x.shape[0]), cond, negative, guidance).float()

        noise = noise.to(self.device, torch.float32)
        renoise = renoise or sampling.renoise_rule(self.config.guidance_mode)
        with self.averaged_lora(), den.merged_lora():
            if den.is_flow:
                return sampling.sample_flow(model_fn, noise, flow_sigmas(num_steps), generator, renoise=renoise)
            return sampling.sample_discrete(model_fn, noise, trailing_timesteps(num_steps), den.alphas_cumprod,
                                            den.prediction_type, generator, renoise=renoise)

    # ---- checkpointing ----
    def lora_state_dict(self) -> dict[str, Tensor]:
        """peft-named LoRA tensors of the student (`<module>.lora_A.weight`, ...): its EMA when ema_decay > 0."""
        with self.averaged_lora():
            return self.denoiser.lora_state_dict()

    def state_dict(self) -> dict:
        """Everything for an exact resume (flash_core.trainer_state.trainer_state)."""
        return trainer_state(self)

    def load_state_dict(self, state: dict) -> None:
        load_trainer_state(self, state)
