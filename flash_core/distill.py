"""Flash Diffusion training: one optimiser step of the student (and of the discriminator) and the loop state.

Public API (used by training/cli/, training/digits/ and the ComfyUI training node):

    DistillConfig(backbone="sd15", total_steps=20_000, seed=0, batch_size=None, lora_rank=None,
                  lora_alpha=None, lora_targets=None, lr=None, guidance_range=None, teacher_grid_steps=None,
                  distill_weights=None, adversarial_weights=None, dmd_weights=None, distill_loss="l2",
                  grad_checkpointing=False, mixed_precision="no", alternate_updates=True)
                                                                         # None = the recipe's number
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
        .student_x0(z_t, t, cond) -> Tensor                             # LCM-boundary student output
        .distribution_matching_loss(x, cond, uncond) -> Tensor          # DMD loss of a student sample
        .train_step(batch) -> dict[str, float]        # one iteration: the student OR the discriminator updates
                                                      # (alternating), losses, student_update / discriminator_update
                                                      # flags, seconds: teacher_s, student_s, discriminator_s, dmd_s
        .student_sample(noise, cond, num_steps=4, generator=None) -> Tensor   # LoRA merged while sampling
        .state_dict() -> dict / .load_state_dict(d)                     # exact resume
        .lora_state_dict() -> dict[str, Tensor]                         # peft-named student LoRA

Around it: flash_core.recipes (Recipe, RECIPES, get_recipe), flash_core.denoiser (Conditioning, Denoiser ABC
with predict / encoder_features / add_lora / lora_parameters / set_lora_enabled / teacher() / lora_state_dict,
zero_conditioning, noise_coefficients, add_noise, output_to_x0_eps), flash_core.losses (distillation_loss,
DiscriminatorHead, discriminator_loss, generator_adversarial_loss, dmd_gradient, dmd_loss) and
flash_core.backends.diffusers (UNetDenoiser, PixArtDenoiser, SD3Denoiser, make_diffusers_denoiser).

The recipe as implemented: `step` / `total_steps` count iterations, as the paper does ("20k iterations"). By
default iterations alternate: even ones update the student (LoRA), odd ones the discriminator head, so 20k
iterations are 10k student updates (alternate_updates=False: both on every iteration). The four phases split
the iterations. Every sample of a batch draws its own adversarial re-noising level (t in {10, 250, 500, 750})
and its own DMD timestep; the student's grid index and the teacher guidance w are drawn once per batch.

Randomness is counter-based: every iteration draws from fresh generators seeded by (seed, process_index,
step, stream), so the draws of any iteration are known without replaying the earlier ones (a resume needs
only the step; flash_core.target_cache precomputes teacher targets of any iteration). Two streams: "target"
(`target_inputs`: grid index from the phase mixture, guidance w, the z_t noise, drawn on the CPU so every
device gives the same) and "rest" (adversarial t and noise, DMD draws).

Mixed precision ("bf16", as accelerate / Lightning "bf16-mixed"): frozen weights may be bf16, the forward
passes run under bf16 autocast, and everything trainable (LoRA adapters, discriminator head) and so the AdamW
state is float32; FlashDistiller refuses trainable parameters of another dtype.

accelerate / DDP: pass `backward=accelerator.backward`, `process_index=accelerator.process_index` (distinct
noise per process) and `reduce_gradients=` a callable that all-reduces (averages) the `.grad` of the given
parameters — the student runs through the plain network (teacher and student share it), so gradients of
`student_params` and of the discriminator head are synchronised explicitly, not by a DDP wrapper.
Optimisers may be wrapped with `accelerator.prepare`. Defaults: single process, `loss.backward()`.
Everything trainable is reachable: `student_params`, `discriminator`, `student_optimizer`,
`discriminator_optimizer`.
"""

from __future__ import annotations

import hashlib
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from flash_core import sampling
from flash_core.dependencies import require
from flash_core.denoiser import (
    Conditioning,
    Denoiser,
    add_noise,
    noise_coefficients,
    output_to_x0_eps,
)
from flash_core.losses import (
    DISTILL_LOSSES,
    LPIPS_REMOVED,
    DiscriminatorHead,
    discriminator_loss,
    distillation_loss,
    dmd_gradient,
    dmd_loss,
    generator_adversarial_loss,
)
from flash_core.recipes import Recipe, get_recipe, lora_alpha_for_rank
from flash_core.schedules import (
    NUM_TRAIN_TIMESTEPS,
    flow_sigmas,
    flow_teacher_sigmas,
    phase_of_step,
    timestep_mixture_probs,
    trailing_timesteps,
)

MIXED_PRECISION = ("no", "bf16")


@dataclass
class DistillConfig:
    """Run settings; every `None` falls back to the backbone's Recipe (flash_core/recipes.py).

    total_steps: training iterations (the paper's count; the four phases split them). With
    alternate_updates (the paper) even iterations update the student and odd ones the discriminator, so the
    student gets total_steps / 2 updates; alternate_updates=False updates both on every iteration.
    """

    backbone: str = "sd15"
    total_steps: int = 20_000
    seed: int = 0
    batch_size: int | None = None
    lora_rank: int | None = None
    lora_alpha: int | float | None = None  # None: the recipe's, or lora_alpha_for_rank of lora_rank
    lora_targets: tuple[str, ...] | None = None
    lr: float | None = None
    guidance_range: tuple[float, float] | None = None
    teacher_grid_steps: int | None = None
    distill_weights: tuple[float, ...] | None = None
    adversarial_weights: tuple[float, ...] | None = None
    dmd_weights: tuple[float, ...] | None = None
    distill_loss: str = "l2"
    grad_checkpointing: bool = False
    mixed_precision: str = "no"
    alternate_updates: bool = True

    def __post_init__(self) -> None:
        if self.distill_loss == "lpips":
            raise ValueError(LPIPS_REMOVED)
        if self.distill_loss not in DISTILL_LOSSES:
            raise ValueError(f"distill_loss must be one of {DISTILL_LOSSES}, got {self.distill_loss!r}")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"mixed_precision must be one of {MIXED_PRECISION}, got {self.mixed_precision!r}")
        if self.total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {self.total_steps}")
        self.recipe()  # the overrides make a valid recipe (per-phase weights, K a multiple of the 4-step grid)

    def recipe(self) -> Recipe:
        """The backbone's recipe with this config's overrides applied (a rank without an alpha keeps the recipe's
        LoRA scale: recipes.lora_alpha_for_rank)."""
        base = get_recipe(self.backbone)
        alpha = self.lora_alpha
        if alpha is None and self.lora_rank is not None:
            alpha = lora_alpha_for_rank(base, self.lora_rank)
        overrides = {
            "batch_size": self.batch_size, "lora_rank": self.lora_rank, "lora_alpha": alpha,
            "lora_targets": tuple(self.lora_targets) if self.lora_targets is not None else None,
            "lr": self.lr, "teacher_grid_steps": self.teacher_grid_steps,
            "guidance_range": tuple(self.guidance_range) if self.guidance_range is not None else None,
            "distill_weights": _tuple(self.distill_weights), "adversarial_weights": _tuple(self.adversarial_weights),
            "dmd_weights": _tuple(self.dmd_weights),
        }
        return replace(base, **{k: v for k, v in overrides.items() if v is not None})


def _tuple(values):
    return tuple(float(v) for v in values) if values is not None else None


@dataclass
class Batch:
    """One training batch: VAE latents of real images and their (un)conditional embeddings."""

    latents: Tensor
    cond: Conditioning
    uncond: Conditioning


# ---- teacher --------------------------------------------------------------------------------------
def _flow_grid(grid_steps: int, student_steps: int | None) -> list[float]:
    """Flow sigmas of the teacher's K-step solve (schedules.flow_teacher_sigmas: diffusers' shift-3 grid), the
    same in training and previews; student_steps n only has to divide K (the mixture's modes at j*K/n)."""
    if student_steps is not None and (student_steps < 1 or grid_steps % student_steps):
        raise ValueError(f"the K={grid_steps} teacher grid must be a multiple of the {student_steps}-step student grid")
    return flow_teacher_sigmas(grid_steps)


def training_grid(denoiser: Denoiser, grid_steps: int, student_steps: int | None = None) -> list[float]:
    """The K-step teacher grid in model timesteps: trailing DDPM timesteps, or flow sigmas * 1000.

    The timestep mixture's modes sit at indices 0, K/4, K/2, 3K/4 (phase_mixture_probs), as in the reference: on
    the trailing grid t = 999 / 749 / 499 / 249 (the student's 4-step grid too), on SD3's flow grid
    sigma = 1.0 / 0.896 / 0.739 / 0.470 (not its 4-step sampling sigmas 1.0 / 0.857 / 0.601 / 0.003).
    """
    if denoiser.is_flow:  # SD3: shifted sigmas, t = sigma*T
        return [s * NUM_TRAIN_TIMESTEPS for s in _flow_grid(grid_steps, student_steps)]
    return [float(t) for t in trailing_timesteps(grid_steps)]  # K=32: 999, 968, ..., 30


def guided_output(
    denoiser: Denoiser, x_t: Tensor, t: Tensor, cond: Conditioning, uncond: Conditioning, guidance: float | Tensor
) -> Tensor:
    """Classifier-free guidance in one batched forward: w*out_cond + (1-w)*out_uncond.

    guidance: one float, or a tensor with one w per sample (then combined in float32)."""
    batch = x_t.shape[0]
    t = torch.as_tensor(t, device=x_t.device).float().reshape(-1).expand(batch)
    both = Conditioning.cat([uncond.expand_to(batch), cond])
    raw = denoiser.predict(torch.cat([x_t, x_t]), torch.cat([t, t]), both)
    raw_uncond, raw_cond = raw.chunk(2)
    if isinstance(guidance, Tensor):  # per-sample w, broadcast over the sample's dimensions
        w = guidance.to(raw.device, torch.float32).reshape(-1, *([1] * (raw.ndim - 1)))
        return w * raw_cond.float() + (1.0 - w) * raw_uncond.float()  # eps = w eps_c + (1-w) eps_u
    return guidance * raw_cond + (1.0 - guidance) * raw_uncond  # eps = w eps_c + (1-w) eps_u


def _teacher_scheduler(denoiser: Denoiser, grid_steps: int, student_steps: int | None = None):
    """diffusers solver of the teacher on the K grid: DPM-Solver++(2M) trailing, or flow Euler (SD3)."""
    require("diffusers", "The teacher's solver of Flash distillation")
    if denoiser.is_flow:
        from diffusers import FlowMatchEulerDiscreteScheduler

        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, shift=1.0)
        scheduler.set_timesteps(sigmas=_flow_grid(grid_steps, student_steps))  # already shifted
        return scheduler
    from diffusers import DPMSolverMultistepScheduler

    abar = denoiser.alphas_cumprod.double().cpu()
    betas = 1.0 - abar / torch.cat([abar.new_ones(1), abar[:-1]])  # beta_t = 1 - abar_t / abar_{t-1}
    scheduler = DPMSolverMultistepScheduler(
        num_train_timesteps=len(abar), trained_betas=betas.numpy(), algorithm_type="dpmsolver++",
        solver_order=2, timestep_spacing="trailing", prediction_type=denoiser.prediction_type,
    )
    scheduler.set_timesteps(grid_steps)
    if [int(t) for t in scheduler.timesteps] != trailing_timesteps(grid_steps, len(abar)):
        raise RuntimeError("diffusers' trailing DPM-Solver++ grid differs from schedules.trailing_timesteps")
    return scheduler


@torch.no_grad()
def teacher_target(
    denoiser: Denoiser, z_t: Tensor, grid_index: int, cond: Conditioning, uncond: Conditioning,
    guidance: float | Tensor, grid_steps: int, student_steps: int | None = None,
) -> Tensor:
    """Teacher's fully denoised x0: multi-step solve with CFG from grid index `grid_index` to the end.

    Run under the caller's teacher context (LoRA disabled); no gradient. student_steps: see training_grid.
    guidance: one w, or one per sample (a tensor [B]; training and the target cache pass that).
    """
    scheduler = _teacher_scheduler(denoiser, grid_steps, student_steps)
    sample = z_t.float()
    for t in scheduler.timesteps[grid_index:]:
        raw = guided_output(denoiser, sample, t.to(sample.device), cond, uncond, guidance)
        sample = scheduler.step(raw, t, sample, return_dict=False)[0]  # DPM-Solver++ 2M (flow: Euler) step
    return sample


# ---- the training randomness ------------------------------------------------------------------------
TARGET_STREAM, REST_STREAM = "target", "rest"


def stream_seed(seed: int, process_index: int, step: int, stream: str) -> int:
    """Seed of one stream of one iteration of one process: a hash of the four (counter-based, stateless)."""
    digest = hashlib.sha256(f"flash|{seed}|{process_index}|{step}|{stream}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def step_generator(seed: int, process_index: int, step: int, stream: str, device="cpu") -> torch.Generator:
    return torch.Generator(device).manual_seed(stream_seed(seed, process_index, step, stream))


def sample_grid_index(probs: Tensor, generator: torch.Generator) -> int:
    """One K-grid index from the timestep mixture p(grid index)."""
    return int(torch.multinomial(probs, 1, generator=generator))


def phase_mixture_probs(recipe: Recipe, phase: int) -> Tensor:
    """p(grid index) of `phase` on the recipe's K grid: modes at indices 0, K/4, K/2, 3K/4 (training_grid)."""
    return timestep_mixture_probs(recipe.phase_mode_weights[phase], recipe.teacher_grid_steps)


@dataclass(frozen=True)
class TargetInputs:
    """The draws of one iteration that define its teacher target: grid index (phase mixture), guidance w, and
    the noise eps of z_t = sqrt(abar) z0 + sqrt(1-abar) eps (CPU float32, the batch's latent shape)."""

    grid_index: int
    guidance: float
    noise: Tensor


def target_inputs(
    config: DistillConfig, step: int, process_index: int, latent_shape, grid_sampler: Callable | None = None
) -> TargetInputs:
    """The target-defining draws of iteration `step` of process `process_index` (the "target" stream).

    The one home of these draws: FlashDistiller.train_step and the target cache's build call it. grid_sampler
    (phase, generator) -> int replaces the mixture sampler (FlashDistiller passes its sample_grid_index)."""
    recipe = config.recipe()
    generator = step_generator(config.seed, process_index, step, TARGET_STREAM)
    phase = phase_of_step(step, config.total_steps, recipe.num_phases)
    if grid_sampler is not None:
        grid_index = int(grid_sampler(phase, generator=generator))
    else:
        grid_index = sample_grid_index(phase_mixture_probs(recipe, phase), generator)
    low, high = recipe.guidance_range
    guidance = low + (high - low) * float(torch.rand((), generator=generator, dtype=torch.float64))  # w ~ U[min, max]
    noise = torch.randn(tuple(latent_shape), generator=generator, dtype=torch.float32)
    return TargetInputs(grid_index, guidance, noise)


def student_updates(config: DistillConfig) -> list[int]:
    """The iterations that update the student (and so need a teacher target): every one, or the even ones."""
    return list(range(0, config.total_steps, 2 if config.alternate_updates else 1))


def student_input(denoiser: Denoiser, grid: list[float], latents: Tensor, inputs: TargetInputs) -> tuple[Tensor, Tensor]:
    """(z_t, t) of the student and the teacher solve; grid index 0 = pure Gaussian noise."""
    size = latents.shape[0]
    t = torch.full((size,), float(grid[inputs.grid_index]), device=latents.device)
    noise = inputs.noise.to(latents.device)
    if inputs.grid_index == 0:
        return noise, t
    return add_noise(denoiser, latents, noise, t), t  # z_t = sqrt(abar) z0 + sqrt(1-abar) eps


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
    ):
        self.denoiser = denoiser
        self.config = config
        self.recipe = config.recipe()
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
        return target_inputs(self.config, step, self.process_index, latent_shape, self.sample_grid_index)

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
    def student_x0(self, z_t: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        """Student output x = c_skip(t) z_t + c_out(t) x0_pred (LCM boundary; flow models: x0 = x_t - sigma v)."""
        with self._autocast():
            raw = self.denoiser.predict(z_t, t, cond)
        x0_pred, _ = output_to_x0_eps(self.denoiser, raw.float(), z_t, t)
        if self.denoiser.is_flow:
            return x0_pred  # the SD3 sampler (flash_core.sampling.sample_flow) uses x0 = x - sigma v as is
        return sampling.lcm_boundary_x0(x0_pred, z_t, t)  # x = c_skip z_t + c_out x0_pred

    # ---- one iteration ----
    def train_step(self, batch: Batch) -> dict[str, float]:
        """One training iteration; `step` counts iterations (the paper's "20k iterations").

        alternate_updates (default, the paper): even iterations update the student, odd iterations the
        discriminator head; otherwise both update on every iteration (the student first).
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
        # 2. Adversarial re-noising, per sample: t in {10, 250, 500, 750} (flow: sigma = t/1000), the SAME
        #    noise for real and fake.
        t_adv = self._choices(self.recipe.adversarial_timesteps, size)
        adv_noise = self._noise(latents)

        # 3. The student's update, or (discriminator iteration) its fake sample without gradient.
        fake_features = None
        if update_student:
            x, fake_features = self._student_update(latents, z_t, t, inputs, cond, uncond, phase, t_adv,
                                                    adv_noise, timings)
        else:
            start = self._sync()
            with torch.no_grad():
                x = self.student_x0(z_t, t, cond)
            timings["discriminator_s"] += self._sync() - start

        # 4. The discriminator head's LSGAN update: real latents vs the student's x0.
        if update_discriminator:
            start = self._sync()
            loss_disc = self._discriminator_step(latents, x.detach(), fake_features, adv_noise, t_adv, cond)
            self._discriminator_logs = {"loss_discriminator": loss_disc}
            timings["discriminator_s"] += self._sync() - start

        self.step += 1
        return {
            **self._student_logs, **self._discriminator_logs,
            "student_update": float(update_student), "discriminator_update": float(update_discriminator),
            "phase": float(phase), "grid_index": float(grid_index), **timings,
        }

    def _student_update(
        self, latents: Tensor, z_t: Tensor, t: Tensor, inputs: TargetInputs, cond: Conditioning, uncond: Conditioning,
        phase: int, t_adv: Tensor, adv_noise: Tensor, timings: dict[str, float],
    ) -> tuple[Tensor, Tensor | None]:
        """Teacher target (solved, or read from the target cache), the weighted losses, one AdamW step of the
        LoRA. Returns x and its encoder features."""
        den, recipe = self.denoiser, self.recipe
        w_distill, w_adv, w_dmd = recipe.distill_weights[phase], recipe.adversarial_weights[phase], recipe.dmd_weights[phase]
        guidance = inputs.guidance  # w ~ U[min, max], once per batch

        start = self._sync()
        if self.target_cache is not None:
            x0_teacher = self.target_cache.target(self.step, self.process_index, inputs, z_t.shape).to(self.device)
        else:
            per_sample = torch.full((z_t.shape[0],), guidance, dtype=torch.float64)  # as the cache's batched solve
            with torch.no_grad(), den.teacher(), self._autocast():
                x0_teacher = teacher_target(den, z_t, inputs.grid_index, cond, uncond, per_sample,
                                            recipe.teacher_grid_steps, recipe.student_steps)
        timings["teacher_s"] += self._sync() - start

        start = self._sync()
        x = self.student_x0(z_t, t, cond)
        loss_distill = distillation_loss(x, x0_teacher.float(), self.config.distill_loss)
        total = w_distill * loss_distill
        logs: dict[str, float] = {"guidance": guidance}
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
            loss_dmd = self.distribution_matching_loss(x, cond, uncond)
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
        self.student_optimizer.zero_grad(set_to_none=True)
        self.discriminator.zero_grad(set_to_none=True)  # the generator pass also reached the head
        timings["student_s"] += self._sync() - start
        self._student_logs = logs
        return x, fake_features

    def distribution_matching_loss(self, x: Tensor, cond: Conditioning, uncond: Conditioning) -> Tensor:
        """DMD: re-noise x at t ~ U{0..999} per sample; real score = CFG teacher, fake = the student (cond, no grad)."""
        den, size = self.denoiser, x.shape[0]
        uncond = uncond.expand_to(size)
        t_dmd = torch.randint(NUM_TRAIN_TIMESTEPS, (size,), generator=self.cpu_generator).float().to(self.device)
        x_noisy = add_noise(den, x.detach(), self._noise(x), t_dmd)  # re-noised student sample
        guidance = self._uniform(*self.recipe.guidance_range)  # fresh w for the real score, once per batch
        with torch.no_grad():
            with den.teacher(), self._autocast():
                raw_real = guided_output(den, x_noisy, t_dmd, cond, uncond, guidance)
            with self._autocast():
                raw_fake = den.predict(x_noisy, t_dmd, cond)
        x0_real, eps_real = output_to_x0_eps(den, raw_real.float(), x_noisy, t_dmd)
        _, eps_fake = output_to_x0_eps(den, raw_fake.float(), x_noisy, t_dmd)
        alpha, sigma = noise_coefficients(den, t_dmd, x.ndim)
        grad = dmd_gradient(x, x0_real, eps_real, eps_fake, alpha, sigma)
        return dmd_loss(x, grad)

    def _discriminator_step(
        self, latents: Tensor, fake_x0: Tensor, fake_features: Tensor | None, noise: Tensor, t: Tensor,
        cond: Conditioning,
    ) -> float:
        """LSGAN step of the head: real = dataset latents, fake = student x0, same noise and t (per sample)."""
        den = self.denoiser
        with torch.no_grad(), den.teacher(), self._autocast():
            real_features = den.encoder_features(add_noise(den, latents, noise, t), t, cond)
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
        self, noise: Tensor, cond: Conditioning, num_steps: int = 4, generator: torch.Generator | None = None
    ) -> Tensor:
        """Few-step latents from the student (flash_core.sampling's LCM-style loop on the training grid).

        The LoRA is merged into the weights for the duration (Denoiser.merged_lora): no per-call adapter cost,
        the weights restored exactly afterwards.
        """
        den = self.denoiser
        cond = cond.to(self.device)

        def model_fn(x: Tensor, t) -> Tensor:
            with self._autocast():
                return den.predict(x, self._timestep(t, x.shape[0]), cond).float()

        noise = noise.to(self.device, torch.float32)
        with den.merged_lora():
            if den.is_flow:
                return sampling.sample_flow(model_fn, noise, flow_sigmas(num_steps), generator=generator)
            return sampling.sample_discrete(
                model_fn, noise, trailing_timesteps(num_steps), den.alphas_cumprod, den.prediction_type, generator
            )

    # ---- checkpointing ----
    def lora_state_dict(self) -> dict[str, Tensor]:
        """peft-named LoRA tensors of the student (`<module>.lora_A.weight`, ...)."""
        return self.denoiser.lora_state_dict()

    def state_dict(self) -> dict:
        """Everything for an exact resume (weights_only-loadable; the training draws are counter-based, so the
        step is all a resume needs of them). The settings are not here: flash_core.run stores them beside this
        state and compares them on resume (Run.differences), their one home."""
        state = {
            "step": self.step,
            "lora": {n: p.detach().cpu().clone() for n, p in self.denoiser.named_lora_parameters()},
            "discriminator": {k: v.detach().cpu().clone() for k, v in _unwrap(self.discriminator).state_dict().items()},
            "student_optimizer": self.student_optimizer.state_dict(),
            "discriminator_optimizer": self.discriminator_optimizer.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "python_random": random.getstate(),
            "student_logs": dict(self._student_logs),
            "discriminator_logs": dict(self._discriminator_logs),
        }
        if torch.cuda.is_available():
            state["cuda_rng"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state: dict) -> None:
        params = dict(self.denoiser.named_lora_parameters())
        missing = set(params) - set(state["lora"])
        if missing:
            raise KeyError(f"checkpoint lacks LoRA tensors, e.g. {sorted(missing)[:3]}: rank/targets differ?")
        with torch.no_grad():
            for name, param in params.items():
                param.copy_(state["lora"][name])
        _unwrap(self.discriminator).load_state_dict(state["discriminator"])
        self.student_optimizer.load_state_dict(state["student_optimizer"])
        self.discriminator_optimizer.load_state_dict(state["discriminator_optimizer"])
        torch.set_rng_state(state["torch_rng"])
        random.setstate(_as_tuple(state["python_random"]))
        if "cuda_rng" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self.step = int(state["step"])
        self._student_logs = dict(state.get("student_logs", {}))
        self._discriminator_logs = dict(state.get("discriminator_logs", {}))


def _unwrap(module: nn.Module) -> nn.Module:
    """The module inside a DDP / accelerate wrapper."""
    return getattr(module, "module", module)


def _as_tuple(value):
    return tuple(_as_tuple(v) for v in value) if isinstance(value, list) else value
