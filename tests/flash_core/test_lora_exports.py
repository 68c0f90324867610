"""flash_core.lora_formats.build_lora_export: every backbone's student in every format, loaded by diffusers.

The SD3 diffusers export goes through a real (tiny) StableDiffusion3Pipeline's load_lora_weights; PixArt's
through PEFT (diffusers has no LoRA loader for PixArt, so that format is not offered). ComfyUI applying
the "comfyui" exports is tested in tests/nodes/test_loaders.py.
"""

from __future__ import annotations

import json
import logging
import sys
import warnings
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "nodes"))
import lora_fixtures as F

from flash_core import lora_formats as L
from training.fixtures.comfy_env import comfyui_path

SD1_TOKENIZER = "comfy/sd1_tokenizer"  # CLIP-L vocab + merges, shipped inside ComfyUI


@pytest.fixture(scope="module")
def sd3():
    base = F.dit_transformer("sd3")
    modules, student = F.dit_student("sd3", base)
    return base, modules, student


@pytest.fixture(scope="module")
def pixart():
    base = F.dit_transformer("pixart")
    modules, student = F.dit_student("pixart", base)
    return base, modules, student


def _sd3_inputs(batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"hidden_states": torch.randn(batch, 16, 16, 16, generator=g),
            "encoder_hidden_states": torch.randn(batch, 7, 64, generator=g),
            "pooled_projections": torch.randn(batch, 64, generator=g),
            "timestep": torch.tensor([999.0, 500.0][:batch]), "return_dict": False}


def _pixart_inputs(batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"hidden_states": torch.randn(batch, 4, 8, 8, generator=g),
            "encoder_hidden_states": torch.randn(batch, 5, 32, generator=g),
            "timestep": torch.tensor([999, 500][:batch]),
            "added_cond_kwargs": {"resolution": torch.tensor([[64.0, 64.0]] * batch),
                                  "aspect_ratio": torch.tensor([[1.0]] * batch)},
            "return_dict": False}


class _Records(logging.Handler):
    """Collects the diffusers / peft log records (diffusers' loggers do not propagate to the root logger)."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


def _tiny_sd3_pipeline(transformer):
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(str(comfyui_path() / SD1_TOKENIZER), model_max_length=77)
    torch.manual_seed(0)
    text_encoders = [CLIPTextModelWithProjection(CLIPTextConfig(**F.TINY_CLIP_CONFIG)) for _ in range(2)]
    vae = AutoencoderKL(block_out_channels=(8, 16), latent_channels=16, norm_num_groups=8,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae,
        text_encoder=text_encoders[0], tokenizer=tokenizer, text_encoder_2=text_encoders[1], tokenizer_2=tokenizer,
        text_encoder_3=None, tokenizer_3=None,  # T5 is optional in SD3: zeros stand in for its embeddings
    )


# ---------------------------------------------------------------------------------------------------------
# diffusers loads the DiT exports: every key, the trained alpha, the student's output
# ---------------------------------------------------------------------------------------------------------


def test_sd3_diffusers_export_loads_every_key_in_a_sd3_pipeline(sd3, tmp_path):
    import copy

    from peft import get_peft_model_state_dict

    base, modules, student = sd3
    assert len(modules) == F.TINY_SD3_LORA_MODULES
    export = L.build_lora_export(modules, "sd3", "diffusers", metadata={"flash.backbone": "sd3"})
    assert all(k.startswith("transformer.") for k in export.tensors)  # diffusers' SD3 loader reads these only
    path = export.save(tmp_path / "export")
    assert path == tmp_path / "export" / "diffusers" / "pytorch_lora_weights.safetensors"

    pipe = _tiny_sd3_pipeline(copy.deepcopy(base))

    def sample():
        return pipe("a photo of a cat", height=32, width=32, num_inference_steps=1, guidance_scale=1.0,
                    output_type="latent", generator=torch.Generator().manual_seed(0)).images

    before = sample()
    handler = _Records()
    loggers = [logging.getLogger(name) for name in ("diffusers", "peft")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name="flash")
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.removeHandler(handler)
            logger.setLevel(level)
    messages = [r.getMessage() for r in handler.records] + [str(w.message) for w in caught]
    # diffusers says "No LoRA keys associated to CLIPTextModelWithProjection" for each text encoder (there are
    # none); about the transformer it must say nothing: no unexpected / missing keys, no "no LoRA keys"
    complaints = [m for m in messages if "CLIPTextModel" not in m
                  and any(word in m.lower() for word in ("unexpected", "missing", "no lora keys"))]
    assert complaints == []

    # every tensor of the file is in the transformer's adapter, unchanged, at the trained scale alpha / r
    loaded = get_peft_model_state_dict(pipe.transformer, adapter_name="flash")
    expected = {k.removeprefix("transformer."): v for k, v in export.tensors.items()}
    assert loaded.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(loaded[key], value, rtol=0, atol=0)
    scales = {layer.scaling["flash"] for layer in pipe.transformer.modules() if hasattr(layer, "scaling")}
    assert scales == {modules[0].alpha / modules[0].rank} == {0.5}

    # the pipeline's transformer now computes what the trained student computes, and the sample changed
    with torch.no_grad():
        torch.testing.assert_close(pipe.transformer(**_sd3_inputs())[0], student(**_sd3_inputs())[0],
                                   rtol=1e-4, atol=1e-5)
    after = sample()
    assert (after - before).abs().max() > 1e-3


def test_pixart_peft_export_loads_in_peft_as_the_student(pixart, tmp_path):
    """PixArt has no diffusers LoRA loader; its users load the PEFT export with PeftModel.from_pretrained (the
    flash-pixart model card's way), which must give the trained student."""
    import copy

    from peft import PeftModel

    base, modules, student = pixart
    assert len(modules) == F.TINY_PIXART_LORA_MODULES
    path = L.build_lora_export(modules, "pixart", "peft").save(tmp_path)
    with torch.no_grad():
        before = base(**_pixart_inputs())[0]
        loaded = PeftModel.from_pretrained(copy.deepcopy(base), str(path.parent))
        after = loaded(**_pixart_inputs())[0]
        torch.testing.assert_close(after, student(**_pixart_inputs())[0], rtol=1e-4, atol=1e-5)
    assert (after - before).abs().max() > 1e-3


def test_pixart_diffusers_export_is_not_offered():
    assert L.export_formats("pixart") == ("comfyui", "peft")
    with pytest.raises(ValueError, match="'diffusers' is not available for pixart: diffusers has no LoRA loader"):
        L.build_lora_export(_unet_modules(), "pixart", "diffusers")


@pytest.mark.parametrize("backbone", ["sd3", "pixart"])
def test_peft_export_of_a_dit_student_round_trips_with_its_alpha(backbone, sd3, pixart, tmp_path):
    _, modules, _ = {"sd3": sd3, "pixart": pixart}[backbone]
    export = L.build_lora_export(modules, backbone, "peft", base_model="some/base")
    path = export.save(tmp_path)
    config = json.loads((path.parent / L.ADAPTER_CONFIG_NAME).read_text())
    assert (config["r"], config["lora_alpha"], config["base_model_name_or_path"]) == (4, 2.0, "some/base")
    back = L.read_lora(path)
    assert back.formats == (L.PEFT,) and back.warnings == []
    assert {m.path: m.scale for m in back.modules} == {m.path: 0.5 for m in modules}


# ---------------------------------------------------------------------------------------------------------
# The export function: names per backbone and format, metadata, refusals
# ---------------------------------------------------------------------------------------------------------


def _unet_modules():
    return [L.LoraModule(L.UNET, "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", False,
                         torch.ones(2, 8), torch.ones(8, 2), 2.0)]


def test_export_keys_and_files_per_backbone_and_format(sd3):
    _, dit_modules, _ = sd3
    expected = {
        ("sd15", "comfyui"): ("flash_comfyui.safetensors",
                              "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.alpha"),
        ("sdxl", "diffusers"): ("diffusers/pytorch_lora_weights.safetensors",
                                "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight"),
        ("sd15", "peft"): ("peft/adapter_model.safetensors",
                           "base_model.model.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight"),
        ("sd3", "comfyui"): ("flash_comfyui.safetensors", "transformer.transformer_blocks.0.attn.to_q.alpha"),
        ("sd3", "diffusers"): ("diffusers/pytorch_lora_weights.safetensors",
                               "transformer.transformer_blocks.0.attn.to_q.lora_A.weight"),
        ("pixart", "comfyui"): ("flash_comfyui.safetensors", "transformer.pos_embed.proj.lora_down.weight"),
        ("pixart", "peft"): ("peft/adapter_model.safetensors", "base_model.model.pos_embed.proj.lora_B.weight"),
    }
    for (backbone, fmt), (relative, key) in expected.items():
        modules = dit_modules if backbone in ("sd3", "pixart") else _unet_modules()
        if backbone == "pixart":  # the same module names exist in PixArt (pos_embed.proj is a conv there too)
            modules = [m for m in dit_modules if m.path == "pos_embed.proj"]
        export = L.build_lora_export(modules, backbone, fmt, name="flash", metadata={"flash.steps": "5"})
        assert (export.format, export.relative_path) == (fmt, relative)
        assert key in export.tensors, (backbone, fmt, sorted(export.tensors)[:4])
        assert export.metadata["flash.steps"] == "5"
    diffusers = L.build_lora_export(dit_modules, "sd3", "diffusers")
    packed = json.loads(diffusers.metadata[L.DIFFUSERS_METADATA_KEY])
    assert (packed["transformer.r"], packed["transformer.lora_alpha"]) == (4, 2.0)  # what diffusers reads
    assert L.build_lora_export(_unet_modules(), "sd15", "peft").sidecars.keys() == {"peft/adapter_config.json"}
    assert L.export_formats("sd3") == L.export_formats("sd15") == ("comfyui", "diffusers", "peft")


def test_export_refuses_unknown_format_comfy_named_modules_and_non_finite_tensors():
    with pytest.raises(ValueError, match="unknown LoRA export format 'kohya'"):
        L.build_lora_export(_unet_modules(), "sd15", "kohya")
    with pytest.raises(ValueError, match="unknown backbone 'flux'"):
        L.build_lora_export(_unet_modules(), "flux", "comfyui")
    ldm = [L.LoraModule(L.UNET, "input_blocks.1.1.transformer_blocks.0.attn1.to_q", False,
                        torch.ones(2, 8), torch.ones(8, 2), 2.0)]
    assert "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q.alpha" in \
        L.build_lora_export(ldm, "sd15", "comfyui").tensors  # the node's students (LDM paths) export as kohya
    with pytest.raises(ValueError, match="named by a ComfyUI.*input_blocks.1.1"):
        L.build_lora_export(ldm, "sd15", "diffusers")
    comfy_dit = [L.LoraModule(L.UNET, "joint_blocks.0.x_block.attn.qkv", False, torch.ones(2, 8), torch.ones(24, 2), 1)]
    assert "diffusion_model.joint_blocks.0.x_block.attn.qkv.alpha" in \
        L.build_lora_export(comfy_dit, "sd3", "comfyui").tensors
    nan = [L.LoraModule(L.UNET, "transformer_blocks.0.attn.to_q", False, torch.ones(2, 8),
                        torch.full((8, 2), float("nan")), 2.0)]
    with pytest.raises(L.LoraFormatError, match=r"non-finite.*transformer_blocks\.0\.attn\.to_q\.lora_B"):
        L.build_lora_export(nan, "sd3", "comfyui")
