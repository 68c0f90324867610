"""FlashLoRALoader on real ComfyUI: every published Flash LoRA format maps fully onto real SD1.5 / SDXL key
names, and patches a (tiny, SD1.5-named) ComfyUI model exactly as W + strength * (alpha / rank) * B @ A; the
trainer's SD3 / PixArt exports give ComfyUI's own SD3 / PixArt models the student's weights; bad files (pickles,
zips, NaN, malformed adapter_config.json) are refused naming the file and key."""

from __future__ import annotations

import copy
import logging
import os
import pickle
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import lora_fixtures as F

from flash_core import lora_formats as L

CLIP_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


# ---------------------------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def comfy_modules(comfy_path):
    """ComfyUI imported for the CPU (tests/conftest.py), then the modules these tests call into."""
    global comfy, folder_paths
    import comfy.lora
    import comfy.sd
    import comfy.utils
    import folder_paths

    return comfy


@pytest.fixture(scope="module")
def loaders(comfy_modules):
    """nodes/loaders.py imported on its own (absolute imports only), so it is tested whatever state the
    sibling node files are in; inside ComfyUI it is imported through nodes/__init__.py."""
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "nodes" / "loaders.py"
    spec = importlib.util.spec_from_file_location("comfyui_flash_loaders_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def sd15_meta():
    """Full-size SD1.5 in ComfyUI (meta device) and the diffusers SD1.5 UNet's real LoRA target layers."""
    model = F.comfy_unet(F.SD15_COMFY, meta=True)
    diffusers_layers = F.target_layers(F.diffusers_unet(F.SD15_DIFFUSERS))
    return model, diffusers_layers


@pytest.fixture(scope="module")
def sdxl_meta():
    model = F.comfy_unet(F.SDXL_COMFY, meta=True)
    diffusers_layers = F.target_layers(F.diffusers_unet(F.SDXL_DIFFUSERS))
    return model, diffusers_layers


@pytest.fixture(scope="module")
def tiny():
    """A tiny SD1.5-family ComfyUI model + tiny CLIP-L-named text encoder, and the matching real layer names."""
    import transformers

    model = F.model_patcher(F.comfy_unet(F.TINY_SD15_COMFY))
    clip = F.tiny_clip()
    unet_layers = F.target_layers(F.diffusers_unet(F.TINY_SD15_DIFFUSERS), F.ATTENTION_TARGETS + ("proj_in",))
    with torch.device("meta"):
        text_model = transformers.CLIPTextModel(transformers.CLIPTextConfig(**F.TINY_CLIP_CONFIG))
    # the names SD1 LoRA files use: transformers 4's CLIPTextModel layout (5.x has no text_model. wrapper module)
    clip_layers = {name if name.startswith("text_model.") else f"text_model.{name}": layer
                   for name, layer in F.target_layers(text_model, CLIP_TARGETS).items()}
    return model, clip, unet_layers, clip_layers


@pytest.fixture()
def loras_dir(tmp_path, monkeypatch):
    """An isolated ComfyUI 'loras' folder."""
    folder = tmp_path / "loras"
    folder.mkdir()
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "loras",
                        ([str(folder)], set(folder_paths.supported_pt_extensions)))
    return folder


def _to_ldm(model):
    """diffusers UNet path -> ComfyUI/LDM path, from ComfyUI's own map for this model's config."""
    diffusers_to_ldm = comfy.utils.unet_to_diffusers(model.model_config.unet_config)
    return lambda path: diffusers_to_ldm[path + ".weight"][: -len(".weight")]


def _map(model, tensors, clip_model=None, adapter_config=None):
    lora = L.parse_lora_state_dict(tensors, adapter_config=adapter_config, name="test.safetensors")
    keys = comfy.lora.model_lora_keys_unet(model, {})
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    clip_keys = None
    if clip_model is not None:
        clip_keys = comfy.lora.model_lora_keys_clip(clip_model, {})
        shapes.update({k: tuple(v.shape) for k, v in clip_model.state_dict().items()})
    return lora, L.map_lora(lora, keys, clip_keys, shapes, type(model.model_config).__name__)


# ---------------------------------------------------------------------------------------------------------
# Full-size key names: every format maps every key
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["diffusers_lora_A", "diffusers_lora_down", "kohya_diffusers_paths",
                                 "kohya_ldm_paths", "comfyui_native", "peft", "attention_processor"])
def test_every_flash_sd15_format_maps_every_key_of_full_sd15(sd15_meta, fmt):
    model, layers = sd15_meta
    loras = F.make_loras(layers, rank=2, alpha=2.0)
    to_ldm = _to_ldm(model)
    tensors = {
        "diffusers_lora_A": lambda: F.diffusers_state_dict(loras, "lora_A"),
        "diffusers_lora_down": lambda: F.diffusers_state_dict(loras, "lora.down"),
        "kohya_diffusers_paths": lambda: F.kohya_state_dict(loras),
        "kohya_ldm_paths": lambda: F.kohya_state_dict(loras, rename=to_ldm),
        "comfyui_native": lambda: F.comfy_native_state_dict(loras, to_ldm),
        "peft": lambda: F.peft_state_dict(loras),
        "attention_processor": lambda: F.processor_state_dict(loras),
    }[fmt]()
    _, plan = _map(model, tensors)
    assert len(layers) == 128  # 16 transformer blocks x 2 attentions x (q, k, v, out) in SD1.5
    assert len(plan.unet) == 128 and not plan.text_encoder
    # each diffusers module landed on the LDM weight ComfyUI's own diffusers->LDM map names
    expected = {"diffusion_model." + to_ldm(x.path) + ".weight" for x in loras}
    assert {m.target for m in plan.unet} == expected


def test_flash_sdxl_converted_file_maps_every_key_of_full_sdxl(sdxl_meta):
    """comfy/FlashSDXL.safetensors: kohya `lora_unet_` with diffusers paths, 560 attention layers of SDXL."""
    model, layers = sdxl_meta
    loras = F.make_loras(layers, rank=1, alpha=1.0)
    tensors = F.kohya_state_dict(loras)
    assert "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in tensors
    _, plan = _map(model, tensors)
    assert len(plan.unet) == len(layers) == 560
    _, plan = _map(model, F.diffusers_state_dict(loras, "lora_A"))  # the flash-sdxl diffusers release
    assert len(plan.unet) == 560


def test_sdxl_lora_on_sd15_model_is_refused_naming_sdxl(sd15_meta, sdxl_meta):
    model, _ = sd15_meta
    _, sdxl_layers = sdxl_meta
    loras = F.make_loras(sdxl_layers, rank=1, alpha=1.0)
    with pytest.raises(L.LoraMappingError) as error:
        _map(model, F.kohya_state_dict(loras))
    message = str(error.value)
    assert "SDXL LoRA" in message and "SD15 model" in message
    assert "2048-wide cross-attention" in message
    assert "lora_unet_" in message  # lists some of the keys that did not map


def test_flash_sd3_peft_file_maps_every_key_of_full_sd3_with_config_alpha():
    """flash-sd3: PEFT keys on every Linear of the diffusers SD3 transformer; ComfyUI fuses q/k/v (offset
    targets), and the adapter config's lora_alpha is carried into ComfyUI's patches."""
    import comfy.supported_models
    from diffusers import SD3Transformer2DModel

    with torch.device("meta"):
        model = comfy.supported_models.SD3(dict(F.SD3_COMFY)).get_model({})
        layers = {n: m for n, m in SD3Transformer2DModel(**F.SD3_DIFFUSERS).named_modules()
                  if isinstance(m, torch.nn.Linear)}
    loras = F.make_loras(layers, rank=1, alpha=1.0)
    config = {"peft_type": "LORA", "r": 1, "lora_alpha": 8}
    _, plan = _map(model, F.peft_state_dict(loras), adapter_config=config)
    assert len(plan.unet) == len(layers) == 340
    assert any(isinstance(m.target, tuple) for m in plan.unet)  # fused qkv: (weight key, offset) targets
    tensors, to_load = L.comfy_lora_inputs(plan.unet)
    patches = comfy.lora.load_lora(tensors, to_load, log_missing=False)
    assert len(patches) == 340
    assert {p.weights[2] for p in patches.values()} == {8.0}  # ComfyUI scales by weights[2] / rank


@pytest.mark.parametrize("backbone", ["sd3", "pixart"])
def test_full_size_dit_comfyui_export_maps_every_recipe_module(backbone):
    """Full SD3-medium / PixArt-alpha names: every module the recipe's DiT targets pick in the diffusers model
    (SD3 222, PixArt 287) is in ComfyUI's key map for the comfyui export's transformer.* keys."""
    import comfy.supported_models
    from diffusers import PixArtTransformer2DModel, SD3Transformer2DModel

    from flash_core.recipes import DIT_LORA_TARGETS

    meta = torch.device("meta")
    if backbone == "sd3":
        model = comfy.supported_models.SD3(dict(F.SD3_COMFY)).get_model({}, device=meta)
        with meta:
            diffusers_model = SD3Transformer2DModel(**F.SD3_DIFFUSERS)
    else:
        model = comfy.supported_models.PixArtAlpha(dict(F.PIXART_COMFY)).get_model({}, device=meta)
        with meta:
            diffusers_model = PixArtTransformer2DModel(**F.PIXART_DIFFUSERS)
    layers = {n: m for n, m in diffusers_model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))
              and any(n == t or n.endswith("." + t) for t in DIT_LORA_TARGETS)}  # peft's target_modules rule
    assert len(layers) == {"sd3": 222, "pixart": 287}[backbone]
    modules = [L.LoraModule(L.UNET, x.path, False, x.down, x.up, x.alpha) for x in F.make_loras(layers, 1, 1.0)]
    tensors = L.build_lora_export(modules, backbone, "comfyui").tensors
    _, plan = _map(model, tensors)
    assert len(plan.unet) == len(layers)
    assert any(isinstance(m.target, tuple) for m in plan.unet)  # fused q/k/v: (weight key, offset) targets


def test_text_encoder_keys_map_onto_clip(tiny):
    model, clip, _, clip_layers = tiny
    te = F.make_loras(clip_layers, rank=2, alpha=2.0, component="text_encoder")
    for tensors in (F.kohya_state_dict(te), F.diffusers_state_dict(te)):
        _, plan = _map(model.model, tensors, clip.cond_stage_model)
        assert len(plan.text_encoder) == len(clip_layers) == 12 and not plan.unet
        assert all(m.target.startswith("clip_l.transformer.text_model.encoder.layers.") for m in plan.text_encoder)


# ---------------------------------------------------------------------------------------------------------
# Numerics through the node: W + strength * (alpha / rank) * B @ A, exactly
# ---------------------------------------------------------------------------------------------------------


def _expected(model_sd, loras, strength, to_target):
    expected = {k: v.clone() for k, v in model_sd.items()}
    for lora in loras:
        key = to_target(lora)
        expected[key] = expected[key] + strength * lora.delta(expected[key].shape)  # W + s (alpha/r) B A
    return expected


def _assert_weights(actual, expected, base, n_changed):
    """Patched weights equal the expected merge; exactly n_changed weights differ from the base model."""
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(actual[key], value, rtol=1e-5, atol=1e-6, msg=lambda m, key=key: f"{key}: {m}")
    assert sum(not torch.equal(actual[k], base[k]) for k in base) == n_changed


CASES = {
    # name: (writer, alpha in file, expected alpha used)
    "kohya_alpha4_rank8": (lambda u, t, ldm: F.kohya_state_dict(u + t, rename=None), 4.0, 4.0),
    "kohya_ldm_paths": (lambda u, t, ldm: {**F.kohya_state_dict(u, rename=ldm), **F.kohya_state_dict(t)}, 4.0, 4.0),
    "comfyui_native": (lambda u, t, ldm: {**F.comfy_native_state_dict(u, ldm), **F.kohya_state_dict(t)}, 4.0, 4.0),
    "diffusers_lora_A": (lambda u, t, ldm: F.diffusers_state_dict(u + t, "lora_A"), None, 8.0),
    "diffusers_lora_down": (lambda u, t, ldm: F.diffusers_state_dict(u + t, "lora.down"), None, 8.0),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_node_patches_model_and_clip_exactly(tiny, loras_dir, loaders, case):
    model, clip, unet_layers, clip_layers = tiny
    writer, file_alpha, used_alpha = CASES[case]
    rank = 8
    unet = F.make_loras(unet_layers, rank=rank, alpha=file_alpha or rank, seed=1)
    te = F.make_loras(clip_layers, rank=rank, alpha=file_alpha or rank, component="text_encoder", seed=2)
    to_ldm = _to_ldm(model.model)
    F.write(loras_dir / f"{case}.safetensors", writer(unet, te, to_ldm))
    base_model = F.patched_state_dict(model)
    base_clip = F.patched_state_dict(clip.patcher)

    out = loaders.FlashLoRALoader.execute(model, f"{case}.safetensors", 0.7, 1.3, clip=clip)
    new_model, new_clip = out.args
    assert new_model is not model and new_clip is not clip and not model.patches and not clip.patcher.patches

    for lora in unet + te:
        lora.alpha = used_alpha
    expected_model = _expected(base_model, unet, 0.7, lambda x: "diffusion_model." + to_ldm(x.path) + ".weight")
    expected_clip = _expected(base_clip, te, 1.3, lambda x: "clip_l.transformer." + x.path + ".weight")
    _assert_weights(F.patched_state_dict(new_model), expected_model, base_model, len(unet))
    _assert_weights(F.patched_state_dict(new_clip.patcher), expected_clip, base_clip, len(te))
    # the input model is untouched
    torch.testing.assert_close(F.patched_state_dict(model), base_model, rtol=0, atol=0)


@pytest.mark.parametrize("with_config", [True, False])
def test_node_applies_peft_alpha_from_adapter_config(tiny, loras_dir, loaders, caplog, with_config):
    """flash-pixart / flash-sd3 layout: r 64, lora_alpha 8 in adapter_config.json -> scale 0.125, not 1.0."""
    model, _, unet_layers, _ = tiny
    layers = {k: v for k, v in unet_layers.items() if k.endswith(("attn1.to_q", "attn2.to_k"))}
    unet = F.make_loras(layers, rank=64, alpha=8.0, seed=3)
    config = {"peft_type": "LORA", "r": 64, "lora_alpha": 8, "target_modules": ["to_q", "to_k"]}
    folder = loras_dir / "flash-peft"
    F.write(folder / "adapter_model.safetensors", F.peft_state_dict(unet),
            adapter_config=config if with_config else None)
    base = F.patched_state_dict(model)

    with caplog.at_level(logging.WARNING):
        out = loaders.FlashLoRALoader.execute(model, os.path.join("flash-peft", "adapter_model.safetensors"), 1.0, 1.0)
    new_model = (out.args)[0]

    to_ldm = _to_ldm(model.model)
    if not with_config:
        for lora in unet:
            lora.alpha = 64.0  # no alpha anywhere: alpha = rank, and the user is warned
    expected = _expected(base, unet, 1.0, lambda x: "diffusion_model." + to_ldm(x.path) + ".weight")
    _assert_weights(F.patched_state_dict(new_model), expected, base, len(unet))
    warned = any("adapter_config.json" in r.getMessage() and "0.125" in r.getMessage() for r in caplog.records)
    assert warned is (not with_config)


# ---------------------------------------------------------------------------------------------------------
# DiT students (SD3, PixArt): the exports apply to ComfyUI's own SD3 / PixArt models with every key mapped
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["sd3", "pixart"])
def dit(request, comfy_modules):
    """(backbone, ComfyUI model patcher of a tiny diffusers transformer, the student's LoRA modules, the
    ComfyUI weights the student has: its diffusers weights with the LoRA merged, converted by ComfyUI's maps)."""
    backbone = request.param
    base = F.dit_transformer(backbone)
    modules, _ = F.dit_student(backbone, base)
    patcher = F.comfy_dit(backbone, base)
    expected = F.comfy_weights_from_diffusers(backbone, F.merged_state_dict(base, modules))
    return backbone, patcher, modules, expected


def _assert_student_weights(patched, expected, base):
    """Every weight ComfyUI's conversion of the merged student names is patched to it; nothing else moved."""
    changed = {k for k in base if not torch.equal(patched[k], base[k])}
    assert changed and changed <= expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(patched[key], value, rtol=1e-5, atol=1e-6, msg=lambda m, key=key: f"{key}: {m}")


def test_dit_comfyui_export_applies_every_key_to_comfyui_dit_models(dit, loras_dir, loaders, caplog):
    """The CLI's ComfyUI export of an SD3 / PixArt student: FlashLoRALoader maps every module (fused q/k/v as
    offset patches, SD3's swapped adaLN rows) and the model gets the student's weights; stock Load LoRA too."""
    backbone, patcher, modules, expected = dit
    export = L.build_lora_export(modules, backbone, "comfyui", name=f"flash-{backbone}")
    path = export.save(loras_dir)
    assert path.name == f"flash-{backbone}_comfyui.safetensors"
    assert len(modules) == {"sd3": F.TINY_SD3_LORA_MODULES, "pixart": F.TINY_PIXART_LORA_MODULES}[backbone]
    base = F.patched_state_dict(patcher)

    with caplog.at_level(logging.INFO):
        flash_model, _ = loaders.FlashLoRALoader.execute(patcher, path.name, 1.0, 1.0).args
    applied = [r.getMessage() for r in caplog.records if "applied to" in r.getMessage()]
    assert applied == [(f"Flash LoRA Loader: '{path.name}' (diffusers) applied to {len(modules)} model and 0 "
                        "text-encoder weights.")]
    flash_weights = F.patched_state_dict(flash_model)
    _assert_student_weights(flash_weights, expected, base)

    caplog.clear()
    with caplog.at_level(logging.WARNING):
        stock_model, _ = comfy.sd.load_lora_for_models(
            patcher, None, comfy.utils.load_torch_file(str(path), safe_load=True), 1.0, 0.0)
    assert [r.getMessage() for r in caplog.records if "not loaded" in r.getMessage().lower()] == []
    torch.testing.assert_close(F.patched_state_dict(stock_model), flash_weights, rtol=1e-6, atol=1e-7)


def test_dit_peft_export_gives_the_same_student_in_comfyui(dit, loras_dir, loaders):
    backbone, patcher, modules, expected = dit
    path = L.build_lora_export(modules, backbone, "peft").save(loras_dir / backbone)
    base = F.patched_state_dict(patcher)
    out = loaders.FlashLoRALoader.execute(patcher, f"{backbone}/peft/{path.name}", 1.0, 1.0)
    _assert_student_weights(F.patched_state_dict(out.args[0]), expected, base)


def test_dit_student_trained_on_comfyui_model_exports_comfyui_native_keys(loaders, loras_dir):
    """A LoRA on ComfyUI's own SD3 modules (what the node trains) exports as diffusion_model.<path> keys,
    which FlashLoRALoader maps completely."""
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    from flash_core.recipes import DIT_LORA_TARGETS

    patcher = F.comfy_dit("sd3", F.dit_transformer("sd3"))
    network = copy.deepcopy(patcher.model.diffusion_model)
    inject_adapter_in_model(LoraConfig(r=2, lora_alpha=1, target_modules=list(DIT_LORA_TARGETS)), network)
    with torch.no_grad():
        for name, parameter in network.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.05)
    modules = L.modules_from_peft_state_dict(get_peft_model_state_dict(network), 1.0)
    assert any(m.path.startswith("joint_blocks.") for m in modules)
    path = L.build_lora_export(modules, "sd3", "comfyui", name="node-sd3").save(loras_dir)
    assert all(k.startswith("diffusion_model.") for k in L.load_safetensors(path)[0])
    base = F.patched_state_dict(patcher)
    patched = F.patched_state_dict(loaders.FlashLoRALoader.execute(patcher, path.name, 1.0, 1.0).args[0])
    for m in modules:
        key = f"diffusion_model.{m.path}.weight"
        torch.testing.assert_close(patched[key], base[key] + m.delta().reshape(base[key].shape), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------
# Errors the user can hit, through the node
# ---------------------------------------------------------------------------------------------------------


class _CreatesFileWhenUnpickled:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_node_refuses_pickle_checkpoint_without_unpickling(tiny, loras_dir, loaders, tmp_path):
    model = tiny[0]
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(_CreatesFileWhenUnpickled(probe)))  # the payload is live: unpickling creates a file
    assert probe.exists()
    marker = tmp_path / "pwned"
    (loras_dir / "evil.ckpt").write_bytes(pickle.dumps(_CreatesFileWhenUnpickled(marker)))
    with pytest.raises(L.LoraFormatError, match=r"evil\.ckpt.*never unpickles.*\.safetensors"):
        loaders.FlashLoRALoader.execute(model, "evil.ckpt", 1.0, 1.0)
    assert not marker.exists()


@pytest.mark.parametrize("start", [b"\x80", b"PK"], ids=["0x80", "PK"])
def test_node_loads_lora_whose_header_length_looks_like_a_pickle_or_zip_signature(tiny, loras_dir, loaders, start):
    model, _, unet_layers, _ = tiny
    loras = F.make_loras(dict(sorted(unet_layers.items())[:2]), rank=2, alpha=1.0)
    F.safetensors_with_header_start(loras_dir / "lucky.safetensors", F.kohya_state_dict(loras), start)
    base = F.patched_state_dict(model)
    new_model = loaders.FlashLoRALoader.execute(model, "lucky.safetensors", 1.0, 1.0).args[0]
    to_ldm = _to_ldm(model.model)
    expected = _expected(base, loras, 1.0, lambda x: "diffusion_model." + to_ldm(x.path) + ".weight")
    _assert_weights(F.patched_state_dict(new_model), expected, base, len(loras))


def test_node_refuses_torch_checkpoint_and_zip_naming_the_file(tiny, loras_dir, loaders):
    model = tiny[0]
    torch.save({"lora_unet_a.lora_down.weight": torch.zeros(1, 1)}, loras_dir / "trained.pt")
    with pytest.raises(L.LoraFormatError, match=r"trained\.pt' is a pickle-based checkpoint.*Convert it to \.safetensors"):
        loaders.FlashLoRALoader.execute(model, "trained.pt", 1.0, 1.0)
    import zipfile

    with zipfile.ZipFile(loras_dir / "download.safetensors", "w") as archive:  # a zipped LoRA, renamed
        archive.writestr("flash/lora.safetensors", b"...")
    with pytest.raises(L.LoraFormatError, match=r"download\.safetensors' is a zip archive.*unzip it"):
        loaders.FlashLoRALoader.execute(model, "download.safetensors", 1.0, 1.0)


def test_node_refuses_nan_lora_naming_file_and_keys(tiny, loras_dir, loaders):
    model, _, unet_layers, _ = tiny
    tensors = F.kohya_state_dict(F.make_loras(unet_layers, rank=2, alpha=2.0))
    bad = sorted(k for k in tensors if k.endswith(".lora_up.weight"))[:2]
    for key in bad:
        tensors[key] = tensors[key].clone()
        tensors[key][0, 0] = float("nan")
    F.write(loras_dir / "diverged.safetensors", tensors)
    with pytest.raises(L.LoraFormatError) as error:
        loaders.FlashLoRALoader.execute(model, "diverged.safetensors", 1.0, 1.0)
    message = str(error.value)
    assert "diverged.safetensors" in message and all(key in message for key in bad)
    assert "non-finite values (NaN or Inf)" in message and "lower learning rate" in message


def test_node_refuses_malformed_adapter_config_naming_file_and_key(tiny, loras_dir, loaders):
    model, _, unet_layers, _ = tiny
    folder = loras_dir / "flash-peft"
    F.write(folder / "adapter_model.safetensors", F.peft_state_dict(F.make_loras(unet_layers, rank=2, alpha=1.0)),
            adapter_config={"peft_type": "LORA", "r": "abc", "lora_alpha": 8})
    with pytest.raises(L.LoraFormatError, match=r"flash-peft/adapter_config\.json': key 'r' must be a positive "
                                                r"integer \(the LoRA rank\), got 'abc'"):
        loaders.FlashLoRALoader.execute(model, "flash-peft/adapter_model.safetensors", 1.0, 1.0)
    (folder / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 2}')
    with pytest.raises(L.LoraFormatError, match=r"adapter_config\.json' has no 'lora_alpha' key"):
        loaders.FlashLoRALoader.execute(model, "flash-peft/adapter_model.safetensors", 1.0, 1.0)


def test_node_refuses_lora_that_matches_nothing(tiny, loras_dir, loaders):
    model = tiny[0]
    bogus = {"lora_unet_not_a_layer.lora_down.weight": torch.zeros(2, 4),
             "lora_unet_not_a_layer.lora_up.weight": torch.zeros(4, 2)}
    F.write(loras_dir / "bogus.safetensors", bogus)
    with pytest.raises(L.LoraMappingError, match=r"None of the 2 keys of 'bogus.safetensors' match this SD15 model"):
        loaders.FlashLoRALoader.execute(model, "bogus.safetensors", 1.0, 1.0)


def test_node_refuses_partially_unmapped_lora_listing_keys(tiny, loras_dir, loaders):
    model, _, unet_layers, _ = tiny
    tensors = F.kohya_state_dict(F.make_loras(unet_layers, rank=2, alpha=2.0))
    tensors["lora_unet_down_blocks_5_attentions_0_proj_in.lora_down.weight"] = torch.zeros(2, 32)
    tensors["lora_unet_down_blocks_5_attentions_0_proj_in.lora_up.weight"] = torch.zeros(32, 2)
    F.write(loras_dir / "partial.safetensors", tensors)
    with pytest.raises(L.LoraMappingError) as error:
        loaders.FlashLoRALoader.execute(model, "partial.safetensors", 1.0, 1.0)
    message = str(error.value)
    assert f"2 of the {len(tensors)} keys" in message
    assert "lora_unet_down_blocks_5_attentions_0_proj_in.lora_down.weight" in message


def test_node_asks_for_clip_when_file_has_text_encoder_keys(tiny, loras_dir, loaders):
    model, _, _, clip_layers = tiny
    F.write(loras_dir / "te.safetensors", F.kohya_state_dict(F.make_loras(clip_layers, 2, 2.0, "text_encoder")))
    with pytest.raises(L.LoraMappingError, match="connect the CLIP input"):
        loaders.FlashLoRALoader.execute(model, "te.safetensors", 1.0, 1.0)


def test_node_cannot_escape_the_loras_folder(tiny, loras_dir, loaders, tmp_path):
    model, _, unet_layers, _ = tiny
    F.write(tmp_path / "outside.safetensors", F.kohya_state_dict(F.make_loras(unet_layers, 2, 2.0)))
    with pytest.raises(FileNotFoundError):
        loaders.FlashLoRALoader.execute(model, "../outside.safetensors", 1.0, 1.0)


# ---------------------------------------------------------------------------------------------------------
# Export interop with stock ComfyUI
# ---------------------------------------------------------------------------------------------------------


def test_kohya_export_loads_in_stock_loraloader_without_lost_keys(tiny, loras_dir, loaders, caplog):
    """A diffusers-format Flash LoRA converted by flash_core loads in ComfyUI's own LoraLoader path with no
    'lora key not loaded' warnings, and patches the same weights as FlashLoRALoader."""
    model, clip, unet_layers, clip_layers = tiny
    unet = F.make_loras(unet_layers, rank=4, alpha=4.0, seed=5)
    te = F.make_loras(clip_layers, rank=4, alpha=4.0, component="text_encoder", seed=6)
    diffusers_file = F.write(loras_dir / "flash-sd.safetensors", F.diffusers_state_dict(unet + te))

    # stock ComfyUI cannot map modern diffusers keys (the reason this node exists)
    with caplog.at_level(logging.WARNING):
        comfy.sd.load_lora_for_models(model, clip, comfy.utils.load_torch_file(str(diffusers_file), safe_load=True),
                                      1.0, 1.0)
    assert any("lora key not loaded" in r.getMessage() for r in caplog.records)
    caplog.clear()

    exported = L.to_kohya_state_dict(L.read_lora(diffusers_file).modules)
    L.save_lora(loras_dir / "flash-sd-kohya.safetensors", exported)
    with caplog.at_level(logging.INFO):
        stock_model, stock_clip = comfy.sd.load_lora_for_models(
            model, clip, comfy.utils.load_torch_file(str(loras_dir / "flash-sd-kohya.safetensors"), safe_load=True),
            0.9, 1.1)
    lost = [r.getMessage() for r in caplog.records
            if "lora key not loaded" in r.getMessage() or "NOT LOADED" in r.getMessage()]
    assert lost == []

    out = loaders.FlashLoRALoader.execute(model, "flash-sd.safetensors", 0.9, 1.1, clip=clip)
    flash_model, flash_clip = out.args
    torch.testing.assert_close(F.patched_state_dict(stock_model), F.patched_state_dict(flash_model),
                               rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(F.patched_state_dict(stock_clip.patcher), F.patched_state_dict(flash_clip.patcher),
                               rtol=1e-6, atol=1e-7)
    base = F.patched_state_dict(model)
    assert any(not torch.equal(base[k], v) for k, v in F.patched_state_dict(flash_model).items())


def test_node_schema_matches_contract(loaders):
    schema = loaders.FlashLoRALoader.define_schema()
    assert schema.node_id == "FlashLoRALoader" and schema.display_name == "Flash LoRA Loader"
    assert schema.category == "Flash Diffusion"
    inputs = {i.id: i for i in schema.inputs}
    assert list(inputs) == ["model", "clip", "lora_name", "strength_model", "strength_clip"]
    assert inputs["clip"].optional
    assert inputs["strength_model"].default == 1.0 and inputs["strength_clip"].default == 1.0
    assert [o.io_type for o in schema.outputs] == ["MODEL", "CLIP"]
    assert loaders.NODES == [loaders.FlashLoRALoader]
