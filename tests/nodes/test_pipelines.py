"""FlashDiffusersLoader on real ComfyUI: a diffusers SD pipeline of any size loads as MODEL / CLIP / VAE that
give diffusers' own results, work with the stock nodes (KSampler, VAEDecode, LoraLoader), and every folder it
cannot load stops it with an error naming the folder and the fix.

The pipelines are tiny random-weight ones saved with StableDiffusionPipeline.save_pretrained in a temporary
diffusers folder: the digits teacher's architecture (training/digits/teacher.py builders) and a variant that
exercises the other code paths (3 levels, a DownBlock2D, 2 layers per block, per-level transformer depths, constant
head width, linear projections, 8 normalisation groups, v-prediction).
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from training.fixtures.comfy_env import import_comfy_nodes, load_pack

SCALE = 0.4417  # the VAE's scaling_factor (deliberately not SD's 0.18215)
PROMPT = "a photo of the digit seven"
IMAGE = 16  # pixels; the 2-level VAE makes 8x8 latents
LATENT = 8
STEPS = 4
GUIDANCE = 3.0


# ---------------------------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def comfy_modules(comfy_path):
    """ComfyUI for the CPU, one torch thread (shared 2-core machine), and ComfyUI's --fp32-text-enc flag: on the
    CPU ComfyUI keeps text encoders in fp16 by default, which would hide a 1e-4 mismatch under fp16 rounding."""
    global comfy, folder_paths
    import comfy.cli_args
    import comfy.latent_formats
    import comfy.lora
    import comfy.model_management
    import comfy.sample
    import comfy.samplers
    import comfy.sd
    import comfy.supported_models
    import comfy.utils
    import folder_paths

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(comfy.cli_args.args, "fp32_text_enc", True)
        yield comfy
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def node_package(comfy_modules):
    """nodes/ as a bare package (its __init__.py, which imports every node family, is not run): nodes/pipelines.py
    and the diffusers_* modules it imports on their own, as tests/nodes/test_loaders.py imports loaders.py."""
    import importlib
    import types

    name = "comfyui_flash_pipelines_under_test"
    package = types.ModuleType(name)
    package.__path__ = [str(Path(__file__).resolve().parents[2] / "nodes")]
    sys.modules[name] = package
    for module in ("pipelines", "diffusers_folder", "diffusers_convert", "diffusers_build"):
        importlib.import_module(f"{name}.{module}")
    yield package
    for key in [key for key in sys.modules if key == name or key.startswith(f"{name}.")]:
        del sys.modules[key]


@pytest.fixture(scope="module")
def pipelines(node_package):
    """nodes/pipelines.py: the FlashDiffusersLoader node."""
    return node_package.pipelines


@pytest.fixture(scope="module")
def diffusers_folder(node_package):
    """nodes/diffusers_folder.py: finding and reading pipeline folders."""
    return node_package.diffusers_folder


@pytest.fixture(scope="module")
def diffusers_convert(node_package):
    """nodes/diffusers_convert.py: diffusers configs and weight names into ComfyUI's."""
    return node_package.diffusers_convert


@pytest.fixture(scope="module")
def diffusers_build(node_package):
    """nodes/diffusers_build.py: load_pipeline."""
    return node_package.diffusers_build


@pytest.fixture(scope="module")
def comfy_nodes(comfy_modules):
    """ComfyUI's own nodes.py, registered as `nodes` as main.py has it (see tests/nodes/test_graph_compat.py)."""
    return import_comfy_nodes()


def _randomise(module: torch.nn.Module, seed: int) -> None:
    """Perturb every weight (zero biases, unit norms and zero-initialised layers would hide mapping mistakes)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)


def _variant_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(4)
    return UNet2DConditionModel(
        sample_size=LATENT, in_channels=4, out_channels=4, block_out_channels=(16, 32, 64), layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(1, 2, 4),  # heads per level: a constant head width of 16 channels
        transformer_layers_per_block=(1, 2, 1), cross_attention_dim=64, use_linear_projection=True,
        upcast_attention=True, norm_num_groups=8,
    )


def _save_pipeline(folder: Path, variant: str) -> None:
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    from training.digits import teacher

    vae, text_encoder = teacher.build_vae(1), teacher.build_text_encoder(2)
    if variant == "teacher":
        unet, scheduler = teacher.build_unet(3), teacher.build_scheduler()
    else:
        unet = _variant_unet()
        scheduler = DDPMScheduler.from_config(teacher.build_scheduler().config, prediction_type="v_prediction")
    for seed, module in enumerate((vae, text_encoder, unet)):
        _randomise(module, 10 + seed)
    vae.register_to_config(scaling_factor=SCALE)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=teacher.load_tokenizer(), unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)


@pytest.fixture(scope="module")
def diffusers_root(tmp_path_factory, comfy_modules):
    """A diffusers models folder: two pipelines (one nested), plus folders and files that are not pipelines."""
    root = tmp_path_factory.mktemp("diffusers")
    _save_pipeline(root / "tiny", "teacher")
    _save_pipeline(root / "family" / "variant", "variant")
    (root / "not_a_pipeline" / "unet").mkdir(parents=True)
    (root / "readme.txt").write_text("not a pipeline")
    return root


@pytest.fixture()
def diffusers_dir(diffusers_root, monkeypatch):
    """ComfyUI's 'diffusers' folder list pointing at the temporary folder only."""
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "diffusers", ([str(diffusers_root)], {"folder"}))
    return diffusers_root


@pytest.fixture(scope="module")
def loaded(pipelines, diffusers_root):
    """name -> (MODEL, CLIP, VAE) as the node returns them."""
    cache = {}

    def load(name: str):
        if name not in cache:
            with pytest.MonkeyPatch.context() as patch, torch.inference_mode():  # as ComfyUI runs every node
                patch.setitem(folder_paths.folder_names_and_paths, "diffusers", ([str(diffusers_root)], {"folder"}))
                cache[name] = tuple(pipelines.FlashDiffusersLoader.execute(name).result)
        return cache[name]

    return load


def _diffusers_pipeline(folder: Path):
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None, requires_safety_checker=False,
                                                   local_files_only=True)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _encode(clip, text: str):
    """What the stock CLIPTextEncode node does."""
    return clip.encode_from_tokens_scheduled(clip.tokenize(text))


# ---------------------------------------------------------------------------------------------------------
# 1. Equivalence with diffusers
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tiny", "family/variant"])
def test_sampling_matches_diffusers(loaded, diffusers_root, name):
    """Same weights, prompt, noise and sigmas: ComfyUI's euler sampler with CFG gives diffusers' latent.

    diffusers: StableDiffusionPipeline + EulerDiscreteScheduler (trailing: the first sigma is the model's
    sigma_max), output_type="latent", i.e. latents in the scaled space (VAE latent * scaling_factor).
    ComfyUI: comfy.sample.sample_custom with sampler "euler" and the scheduler's own sigma list; it starts
    from noise * sqrt(1 + sigma_max^2) and returns unscaled VAE latents (divided by the latent format's
    scale_factor), so its result * scaling_factor is compared.
    """
    model, clip, vae = loaded(name)
    pipe = _diffusers_pipeline(diffusers_root / name)
    scheduler = pipe.scheduler
    scheduler.set_timesteps(STEPS)
    sigmas = scheduler.sigmas.clone().float()
    model_sampling = model.get_model_object("model_sampling")
    assert math.isclose(float(sigmas[0]), float(model_sampling.sigma_max), rel_tol=1e-5)  # ComfyUI's max_denoise
    assert model.model.latent_format.scale_factor == pytest.approx(SCALE)
    assert comfy.latent_formats.SD15().scale_factor == 0.18215  # ComfyUI's own classes are left as they are
    assert comfy.supported_models.SD15.unet_extra_config == {"num_heads": 8, "num_head_channels": -1}
    assert type(model.model.model_config).__name__ == ("SD15Pipeline" if name == "tiny" else "SD20Pipeline")

    noise = torch.randn((1, 4, LATENT, LATENT), generator=torch.Generator().manual_seed(7))
    start_scale = math.sqrt(1.0 + float(sigmas[0]) ** 2)  # ComfyUI's EPS/V noise_scaling at sigma_max
    with torch.no_grad():
        expected = pipe(PROMPT, negative_prompt="", num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                        height=IMAGE, width=IMAGE, output_type="latent",
                        latents=noise * start_scale / scheduler.init_noise_sigma).images
    sampler = comfy.samplers.sampler_object("euler")
    with torch.inference_mode():
        samples = comfy.sample.sample_custom(model, noise, GUIDANCE, sampler, sigmas, _encode(clip, PROMPT),
                                             _encode(clip, ""), torch.zeros_like(noise), disable_pbar=True, seed=0)
    got = samples * SCALE
    diff = float((got - expected).abs().max())
    scale = float(expected.abs().max())
    print(f"{name}: max |latent diff| = {diff:.3e} (latent max {scale:.3f})")
    assert diff <= 1e-4 * max(1.0, scale), (diff, scale)

    # and a VAE decode of that latent: ComfyUI's VAEDecode image vs diffusers' postprocessed image
    with torch.no_grad():
        reference = (pipe.vae.decode(expected / SCALE).sample / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)
    with torch.inference_mode():
        image = vae.decode(samples)
    assert image.shape == (1, IMAGE, IMAGE, 3)
    assert float((image - reference).abs().max()) <= 1e-4


def test_text_embeddings_match_diffusers(loaded, diffusers_root):
    _, clip, _ = loaded("tiny")
    pipe = _diffusers_pipeline(diffusers_root / "tiny")
    for text in (PROMPT, "", "seven " * 30):
        with torch.no_grad():
            expected = pipe.encode_prompt(text, "cpu", 1, False)[0]
        with torch.inference_mode():
            cond = _encode(clip, text)[0][0]
        assert cond.shape == expected.shape == (1, 77, 64)
        assert float((cond - expected).abs().max()) <= 1e-5, text


def test_vae_matches_diffusers(loaded, diffusers_root):
    """16 normalisation groups (ComfyUI builds 32) and 2 levels (ComfyUI's own converter assumes 4)."""
    _, _, vae = loaded("tiny")
    pipe = _diffusers_pipeline(diffusers_root / "tiny")
    assert vae.downscale_ratio == vae.upscale_ratio == 2 and vae.latent_channels == 4
    latent = torch.randn((2, 4, LATENT, LATENT), generator=torch.Generator().manual_seed(3))
    pixels = torch.rand((2, IMAGE, IMAGE, 3), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        decoded = (pipe.vae.decode(latent).sample / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)
        encoded = pipe.vae.encode(pixels.permute(0, 3, 1, 2) * 2 - 1).latent_dist.mode()
    with torch.inference_mode():
        assert float((vae.decode(latent) - decoded).abs().max()) <= 1e-4
        assert float((vae.encode(pixels) - encoded).abs().max()) <= 1e-4


def test_sharded_weights_and_no_tokenizer_folder(diffusers_build, loaded, diffusers_root, tmp_path):
    """A sharded UNet (safetensors index) loads the same weights; without tokenizer/ ComfyUI's SD1 tokenizer
    (the one the pipeline was saved with) is used."""
    folder = _copy(diffusers_root, tmp_path)
    unet = folder / "unet"
    state = load_file(str(unet / "diffusion_pytorch_model.safetensors"))
    (unet / "diffusion_pytorch_model.safetensors").unlink()
    keys = sorted(state)
    shards = {"diffusion_pytorch_model-00001-of-00002.safetensors": keys[::2],
              "diffusion_pytorch_model-00002-of-00002.safetensors": keys[1::2]}
    for shard, shard_keys in shards.items():
        save_file({k: state[k] for k in shard_keys}, str(unet / shard))
    weight_map = {k: shard for shard, shard_keys in shards.items() for k in shard_keys}
    (unet / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    shutil.rmtree(folder / "tokenizer")

    reference_model, reference_clip, _ = loaded("tiny")
    with torch.inference_mode():
        model, clip, _ = diffusers_build.load_pipeline(folder)
        reference = reference_model.model.diffusion_model.state_dict()
        for key, value in model.model.diffusion_model.state_dict().items():
            assert torch.equal(value, reference[key]), key
        assert torch.equal(_encode(clip, PROMPT)[0][0], _encode(reference_clip, PROMPT)[0][0])


@pytest.mark.parametrize("family", ["SD15", "SD21"])
def test_full_size_configs_give_comfyui_detection_configs(diffusers_convert, family):
    """Real SD1.5 / SD2.1 diffusers configs map to the unet_config ComfyUI's model detection gives those models,
    and every diffusers weight name maps onto a weight of the ComfyUI model (meta device, no memory)."""
    import comfy.supported_models
    from diffusers import UNet2DConditionModel

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import lora_fixtures as F

    diffusers_config = dict(F.SD15_DIFFUSERS)
    comfy_config = dict(F.SD15_COMFY)
    if family == "SD21":
        diffusers_config.update(cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
                                use_linear_projection=True, upcast_attention=True)
        comfy_config.update(context_dim=1024, use_linear_in_transformer=True, num_heads=-1, num_head_channels=64)
    with torch.device("meta"):
        unet = UNet2DConditionModel(**diffusers_config)
    config = diffusers_convert.unet_config_from_diffusers(dict(unet.config), Path("/models/diffusers/full"))
    config.pop("attn_precision", None)
    comfy_config.setdefault("num_head_channels", -1)
    assert config == comfy_config

    ldm = diffusers_convert.convert_unet_state_dict(dict(unet.state_dict()), config, Path("/models/diffusers/full"))
    with torch.device("meta"):
        model = comfy.supported_models.SD15({**config, "dtype": torch.float32}).get_model({})
    expected = model.diffusion_model.state_dict()
    assert set(ldm) == set(expected)
    assert all(tuple(ldm[k].shape) == tuple(expected[k].shape) for k in ldm)


def test_stock_nodes_and_kohya_lora(loaded, comfy_nodes, tmp_path, monkeypatch, caplog):
    """Stock CLIPTextEncode -> LoraLoader (kohya keys, LDM and diffusers paths) -> KSampler -> VAEDecode."""
    model, clip, vae = loaded("tiny")
    loras = tmp_path / "loras"
    loras.mkdir()
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "loras", ([str(loras)], {".safetensors"}))
    generator = torch.Generator().manual_seed(5)
    lora = {}
    targets = {
        "lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_k": (64, 32),  # LDM path
        "lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q": (32, 32),  # diffusers path
        "lora_te_text_model_encoder_layers_1_self_attn_v_proj": (64, 64),
    }
    for name, (fan_in, fan_out) in targets.items():
        lora[f"{name}.lora_down.weight"] = torch.randn((2, fan_in), generator=generator)
        lora[f"{name}.lora_up.weight"] = torch.randn((fan_out, 2), generator=generator)
        lora[f"{name}.alpha"] = torch.tensor(2.0)
    save_file(lora, str(loras / "style.safetensors"))

    with caplog.at_level(logging.WARNING):
        lora_model, lora_clip = comfy_nodes.LoraLoader().load_lora(model, clip, "style.safetensors", 1.0, 1.0)
    assert "lora key not loaded" not in caplog.text
    assert {
        "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
        "diffusion_model.output_blocks.2.1.transformer_blocks.0.attn1.to_q.weight",
    } <= set(lora_model.patches)
    assert "clip_l.transformer.text_model.encoder.layers.1.self_attn.v_proj.weight" in lora_clip.patcher.patches

    with torch.inference_mode():
        positive = comfy_nodes.CLIPTextEncode().encode(lora_clip, PROMPT)[0]
        negative = comfy_nodes.CLIPTextEncode().encode(lora_clip, "")[0]
        latent = {"samples": torch.zeros((1, 4, LATENT, LATENT))}
        sampler = comfy_nodes.KSampler()
        samples = sampler.sample(lora_model, 1, 2, GUIDANCE, "euler", "normal", positive, negative, latent)[0]
        base = sampler.sample(model, 1, 2, GUIDANCE, "euler", "normal", _encode(clip, PROMPT), _encode(clip, ""),
                              latent)[0]
        image = comfy_nodes.VAEDecode().decode(vae, samples)[0]
    assert samples["samples"].shape == (1, 4, LATENT, LATENT) and torch.isfinite(samples["samples"]).all()
    assert not torch.allclose(samples["samples"], base["samples"])  # the LoRA changed the result
    assert image.shape == (1, IMAGE, IMAGE, 3)


def _unet_state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.model.diffusion_model.state_dict().items()}


@pytest.mark.parametrize("name", ["tiny", "family/variant"])
def test_model_can_be_rebuilt_from_its_loader(loaded, diffusers_root, name):
    """Nodes that rebuild a MODEL (ComfyUI 0.30+: clone(force_deepcopy=True) in core Train LoRA and
    TorchCompileModel, clone(disable_dynamic=True) under dynamic VRAM) reload it through the loader's
    cached_patcher_init, as for a checkpoint: a separate model with the same weights and the same patches."""
    import comfy.model_patcher

    model = loaded(name)[0]
    factory, args = model.cached_patcher_init[:2]
    with pytest.MonkeyPatch.context() as patch, torch.inference_mode():
        patch.setitem(folder_paths.folder_names_and_paths, "diffusers", ([str(diffusers_root)], {"folder"}))
        again = factory(*args, disable_dynamic=True)
    assert type(again) is comfy.model_patcher.ModelPatcher and again.model is not model.model
    expected, rebuilt = _unet_state(model), _unet_state(again)
    assert expected.keys() == rebuilt.keys() and all(torch.equal(expected[k], rebuilt[k]) for k in expected)

    key = next(k for k in model.model.state_dict() if k.endswith("attn1.to_q.weight"))
    patched = model.clone()
    patched.add_patches({key: (torch.full_like(model.model.state_dict()[key], 0.5),)}, 1.0)  # a "diff" patch
    if "force_deepcopy" not in inspect.signature(comfy.model_patcher.ModelPatcher.clone).parameters:
        return  # ComfyUI < 0.30 rebuilds nothing
    with torch.inference_mode():
        deep = patched.clone(force_deepcopy=True)
    assert deep.model is not model.model and deep.patches.keys() == patched.patches.keys()
    assert deep.cached_patcher_init == model.cached_patcher_init


def test_core_train_lora_trains_on_the_pipeline_model(loaded, comfy_nodes):
    """ComfyUI's own Train LoRA node (it rebuilds its MODEL on 0.30) trains on a Flash Diffusers MODEL with 8
    normalisation groups and leaves the loaded MODEL as it was."""
    import comfy_extras.nodes_train as nodes_train

    model, clip, _ = loaded("family/variant")
    before = _unet_state(model)
    schema = nodes_train.TrainLoraNode.define_schema()
    inputs = {i.id: [i.default] for i in schema.inputs if getattr(i, "default", None) is not None}
    generator = torch.Generator().manual_seed(3)
    latents = [{"samples": torch.randn((1, 4, LATENT, LATENT), generator=generator)} for _ in range(2)]
    inputs.update(model=[model], latents=latents, positive=[_encode(clip, PROMPT)], batch_size=[2], steps=[2],
                  rank=[2], seed=[0], gradient_checkpointing=[False], existing_lora=["[None]"])
    with torch.inference_mode():  # as ComfyUI runs every node; the node leaves it itself
        result = nodes_train.TrainLoraNode.execute(**inputs)
    outputs = dict(zip((o.io_type for o in schema.outputs), result.result))  # 0.3.75 also returns a MODEL
    lora, losses = outputs["LORA_MODEL"], outputs["LOSS_MAP"]
    assert lora and all(torch.isfinite(t).all() for t in lora.values())
    assert any("to_q" in k for k in lora)
    assert len(losses["loss"]) == 2 and all(math.isfinite(v) for v in losses["loss"])
    after = _unet_state(model)
    assert all(torch.equal(before[k], after[k]) for k in before)


# ---------------------------------------------------------------------------------------------------------
# 2. Errors: folder and fix named
# ---------------------------------------------------------------------------------------------------------


def _copy(diffusers_root: Path, tmp_path: Path, name: str = "broken") -> Path:
    folder = tmp_path / name
    shutil.copytree(diffusers_root / "tiny", folder)
    return folder


def _error(diffusers_build, folder) -> str:
    with pytest.raises(ValueError) as info:
        diffusers_build.load_pipeline(folder)
    return str(info.value)


def test_folder_without_model_index(diffusers_build, diffusers_dir):
    message = _error(diffusers_build, diffusers_dir / "not_a_pipeline")
    assert str(diffusers_dir / "not_a_pipeline") in message
    assert "model_index.json" in message and "save_pretrained" in message


def test_missing_component(diffusers_build, diffusers_root, tmp_path):
    folder = _copy(diffusers_root, tmp_path)
    shutil.rmtree(folder / "vae")
    message = _error(diffusers_build, folder)
    assert str(folder) in message and "vae/" in message and "save_pretrained" in message


@pytest.mark.parametrize("index", [
    {"_class_name": "PixArtAlphaPipeline", "transformer": ["diffusers", "PixArtTransformer2DModel"],
     "text_encoder": ["transformers", "T5EncoderModel"], "vae": ["diffusers", "AutoencoderKL"]},
    {"_class_name": "StableDiffusion3Pipeline", "transformer": ["diffusers", "SD3Transformer2DModel"],
     "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
     "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"], "vae": ["diffusers", "AutoencoderKL"]},
    {"_class_name": "StableDiffusionXLPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
     "text_encoder": ["transformers", "CLIPTextModel"],
     "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
     "vae": ["diffusers", "AutoencoderKL"]},
], ids=["pixart", "sd3", "sdxl"])
def test_non_sd_pipelines_point_to_comfyui_loaders(diffusers_build, diffusers_root, tmp_path, index):
    folder = _copy(diffusers_root, tmp_path)
    (folder / "model_index.json").write_text(json.dumps(index))
    message = _error(diffusers_build, folder)
    assert str(folder) in message and index["_class_name"] in message
    assert "ComfyUI's own loaders" in message


def test_pickle_only_weights_are_refused_not_loaded(diffusers_build, diffusers_root, tmp_path):
    folder = _copy(diffusers_root, tmp_path)
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    (folder / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"never unpickled")
    message = _error(diffusers_build, folder)
    assert str(folder) in message and "diffusion_pytorch_model.bin" in message
    assert "save_pretrained" in message and "safe_serialization=True" in message


@pytest.mark.parametrize("change", ["missing", "unexpected", "shape"])
def test_weight_keys_must_match_the_config(diffusers_build, diffusers_root, tmp_path, change):
    folder = _copy(diffusers_root, tmp_path)
    path = folder / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(path))
    key = "mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight"
    if change == "missing":
        del state[key]
    elif change == "unexpected":
        state["mid_block.attentions.0.transformer_blocks.1.attn2.to_k.weight"] = state[key].clone()
        key = "mid_block.attentions.0.transformer_blocks.1.attn2.to_k.weight"
    else:
        state[key] = torch.zeros(state[key].shape[0], 32)
    save_file(state, str(path))
    message = _error(diffusers_build, folder)
    assert str(folder) in message and key in message and "save_pretrained" in message
    if change == "shape":
        assert "(64, 32)" in message and "(64, 64)" in message


def test_text_encoder_width_must_match_cross_attention(diffusers_build, diffusers_root, tmp_path):
    folder = _copy(diffusers_root, tmp_path)
    config_path = folder / "unet" / "config.json"
    config = json.loads(config_path.read_text())
    config["cross_attention_dim"] = 32
    config_path.write_text(json.dumps(config))
    message = _error(diffusers_build, folder)
    assert str(folder) in message and "cross_attention_dim (32)" in message and "hidden_size (64)" in message


def test_names_never_leave_the_diffusers_folders(pipelines, diffusers_folder, diffusers_dir):
    for name in ("../tiny", "tiny/../../etc", "/etc", "", "no_such_pipeline"):
        with pytest.raises(ValueError) as info:
            pipelines.FlashDiffusersLoader.execute(name)
        assert "pipeline" in str(info.value).lower()
    assert diffusers_folder.resolve_pipeline("family/variant") == diffusers_dir / "family" / "variant"


# ---------------------------------------------------------------------------------------------------------
# 3. Schema and registration
# ---------------------------------------------------------------------------------------------------------


def test_schema_lists_only_pipeline_folders(pipelines, diffusers_dir):
    schema = pipelines.FlashDiffusersLoader.define_schema()
    assert (schema.node_id, schema.display_name, schema.category) == (
        "FlashDiffusersLoader", "Flash Diffusers Pipeline Loader", "Flash Diffusion")
    (pipeline_input,) = schema.inputs
    assert pipeline_input.id == "pipeline"
    assert pipeline_input.options == ["family/variant", "tiny"]
    assert [output.io_type for output in schema.outputs] == ["MODEL", "CLIP", "VAE"]


def test_registered_in_the_pack(comfy_modules):
    nodes = load_pack().nodes
    assert "FlashDiffusersLoader" in [node.define_schema().node_id for module in nodes.NODE_MODULES
                                      for node in module.NODES]
