"""Denoisers over diffusers networks.

* `UNetDenoiser`   — UNet2DConditionModel: SD1.5 (text tokens) and SDXL (plus `text_embeds` = cond.pooled,
  `time_ids` = cond.time_ids). Discriminator features: the frozen UNet up to (and including) its mid block
  (1280 channels for SD1.5 / SDXL).
* `PixArtDenoiser` — PixArtTransformer2DModel (epsilon; learned-sigma channels dropped from `predict`).
* `SD3Denoiser`    — SD3Transformer2DModel (flow matching; t = sigma*1000).
  DiTs have no encoder/decoder split, so (per the paper: "DiTs: head on the teacher's final output") their
  discriminator features are the teacher's full final output map (PixArt: 2*C channels incl. learned sigma).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from flash_core.denoiser import Conditioning, Denoiser
from flash_core.schedules import scaled_linear_alphas_cumprod


def _pixart_alphas_cumprod() -> Tensor:
    """PixArt's "linear" DDPM schedule (beta 1e-4 .. 2e-2), taken from diffusers' own scheduler."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(beta_start=0.0001, beta_end=0.02, beta_schedule="linear").alphas_cumprod.double()


def _param_dtype(module: nn.Module) -> torch.dtype:
    for name, p in module.named_parameters():
        if "lora_" not in name:
            return p.dtype
    return torch.float32


def _timesteps(t: Tensor, batch: int, device) -> Tensor:
    t = torch.as_tensor(t, device=device).float().reshape(-1)
    return t.expand(batch) if t.numel() == 1 else t


class UNetDenoiser(Denoiser):
    """SD1.5 / SDXL UNet2DConditionModel (epsilon or v-prediction, scaled-linear DDPM schedule)."""

    def __init__(self, unet: nn.Module, prediction_type: str = "epsilon", alphas_cumprod: Tensor | None = None):
        self.unet = unet
        self.lora_module = unet
        self.prediction_type = prediction_type
        self.alphas_cumprod = alphas_cumprod if alphas_cumprod is not None else scaled_linear_alphas_cumprod()
        self.encoder_feature_channels = int(unet.config.block_out_channels[-1])
        unet.requires_grad_(False)

    def _added_cond_kwargs(self, cond: Conditioning) -> dict | None:
        if getattr(self.unet.config, "addition_embed_type", None) != "text_time":
            return None
        if cond.pooled is None or cond.time_ids is None:
            raise ValueError("SDXL UNet needs Conditioning.pooled (text_embeds) and Conditioning.time_ids")
        return {"text_embeds": cond.pooled, "time_ids": cond.time_ids}

    def predict(self, x_t: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        dtype = _param_dtype(self.unet)
        cond = cond.to(x_t.device, dtype)
        out = self.unet(
            x_t.to(dtype),
            _timesteps(t, x_t.shape[0], x_t.device),
            encoder_hidden_states=cond.encoder_hidden_states,
            added_cond_kwargs=self._added_cond_kwargs(cond),
            encoder_attention_mask=cond.attention_mask,
            return_dict=False,
        )[0]
        return out.float()

    def encoder_features(self, x_t: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        """UNet down path + mid block (the UNet's own forward, stopped before the up blocks)."""
        unet = self.unet
        dtype = _param_dtype(unet)
        cond = cond.to(x_t.device, dtype)
        sample = x_t.to(dtype)
        timesteps = _timesteps(t, sample.shape[0], sample.device)
        emb = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=timesteps), None)
        added = self._added_cond_kwargs(cond)
        aug_emb = unet.get_aug_embed(emb=emb, encoder_hidden_states=cond.encoder_hidden_states, added_cond_kwargs=added)
        if aug_emb is not None:
            emb = emb + aug_emb
        if unet.time_embed_act is not None:
            emb = unet.time_embed_act(emb)
        hidden = unet.process_encoder_hidden_states(
            encoder_hidden_states=cond.encoder_hidden_states, added_cond_kwargs=added
        )
        sample = unet.conv_in(sample)
        for block in unet.down_blocks:
            if getattr(block, "has_cross_attention", False):
                sample, _ = block(hidden_states=sample, temb=emb, encoder_hidden_states=hidden)
            else:
                sample, _ = block(hidden_states=sample, temb=emb)
        if getattr(unet.mid_block, "has_cross_attention", False):
            sample = unet.mid_block(sample, emb, encoder_hidden_states=hidden)
        else:
            sample = unet.mid_block(sample, emb)
        return sample.float()


class PixArtDenoiser(Denoiser):
    """PixArt-alpha/sigma PixArtTransformer2DModel (epsilon; T5 conditioning with attention mask)."""

    def __init__(self, transformer: nn.Module, alphas_cumprod: Tensor | None = None):
        self.transformer = transformer
        self.lora_module = transformer
        self.prediction_type = "epsilon"
        self.alphas_cumprod = alphas_cumprod if alphas_cumprod is not None else _pixart_alphas_cumprod()
        self.encoder_feature_channels = int(transformer.config.out_channels)
        self.latent_channels = int(transformer.config.in_channels)
        transformer.requires_grad_(False)

    def _forward(self, x_t: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        dtype = _param_dtype(self.transformer)
        cond = cond.to(x_t.device, dtype)
        added = {"resolution": cond.extra.get("resolution"), "aspect_ratio": cond.extra.get("aspect_ratio")}
        return self.transformer(
            x_t.to(dtype),
            encoder_hidden_states=cond.encoder_hidden_states,
            timestep=_timesteps(t, x_t.shape[0], x_t.device),
            added_cond_kwargs=added,
            encoder_attention_mask=cond.attention_mask,
            return_dict=False,
        )[0].float()

    def predict(self, x_t: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        out = self._forward(x_t, t, cond)
        return out[:, : self.latent_channels]  # learned-sigma channels dropped: eps only

    def encoder_features(self, x_t: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        return self._forward(x_t, t, cond)


class SD3Denoiser(Denoiser):
    """SD3 SD3Transformer2DModel: flow matching, x_t = sigma eps + (1-sigma) x0, model timestep sigma*1000."""

    def __init__(self, transformer: nn.Module):
        self.transformer = transformer
        self.lora_module = transformer
        self.prediction_type = "flow"
        self.alphas_cumprod = None
        self.encoder_feature_channels = int(transformer.config.out_channels)
        transformer.requires_grad_(False)

    def predict(self, x_t: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        if cond.pooled is None:
            raise ValueError("SD3 needs Conditioning.pooled (pooled_projections)")
        dtype = _param_dtype(self.transformer)
        cond = cond.to(x_t.device, dtype)
        return self.transformer(
            hidden_states=x_t.to(dtype),
            encoder_hidden_states=cond.encoder_hidden_states,
            pooled_projections=cond.pooled,
            timestep=_timesteps(t, x_t.shape[0], x_t.device),
            return_dict=False,
        )[0].float()

    def encoder_features(self, x_t: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        return self.predict(x_t, t, cond)


# flash_core/backbones.py's registry name -> the Denoiser over its diffusers network
DENOISERS: dict[str, type[Denoiser]] = {"sd15": UNetDenoiser, "sdxl": UNetDenoiser, "pixart": PixArtDenoiser,
                                        "sd3": SD3Denoiser}


def make_diffusers_denoiser(backbone: str, model: nn.Module, **kwargs) -> Denoiser:
    """The Denoiser for a registered backbone ("sd15", "sdxl", "pixart", "sd3") over its diffusers network."""
    if backbone not in DENOISERS:
        raise KeyError(f"no diffusers backend for backbone {backbone!r}; known: {', '.join(DENOISERS)}")
    return DENOISERS[backbone](model, **kwargs)
