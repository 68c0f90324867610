"""flash_core.lora_formats without ComfyUI: safe reading, format detection, alpha rules, mapping errors, export."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from flash_core import lora_formats as L

SD15_UNET = dict(
    sample_size=64, cross_attention_dim=768, block_out_channels=(320, 640, 1280, 1280), attention_head_dim=8,
    layers_per_block=2, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
)
TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


@pytest.fixture(scope="module")
def sd15_layers() -> dict[str, tuple[int, int]]:
    """Real SD1.5 LoRA target names (diffusers UNet on the meta device) -> (out_features, in_features)."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_UNET)
    return {
        name: (layer.out_features, layer.in_features)
        for name, layer in unet.named_modules()
        if isinstance(layer, torch.nn.Linear) and name.endswith(tuple("." + t for t in TARGETS))
    }


def _pairs(layers, rank, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return {
        path: (torch.randn(rank, fan_in, generator=generator), torch.randn(fan_out, rank, generator=generator))
        for path, (fan_out, fan_in) in sorted(layers.items())
    }


def _write(path: Path, tensors, metadata=None) -> Path:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


def _by_path(lora: L.LoraFile) -> dict[str, L.LoraModule]:
    return {m.path: m for m in lora.modules}


# ---------------------------------------------------------------------------------------------------------
# Safe reading
# ---------------------------------------------------------------------------------------------------------


class _CreatesFileWhenUnpickled:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("name", ["evil.ckpt", "evil.pt", "evil.pth", "evil.bin", "renamed-pickle.safetensors"])
def test_pickle_files_are_refused_without_unpickling(tmp_path, name):
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(_CreatesFileWhenUnpickled(probe)))
    assert probe.exists()  # the payload is live: unpickling it creates a file
    marker = tmp_path / "pwned"
    path = tmp_path / name
    path.write_bytes(pickle.dumps(_CreatesFileWhenUnpickled(marker)))
    with pytest.raises(L.LoraFormatError) as error:
        L.read_lora(path)
    assert name in str(error.value) and "Convert it to .safetensors" in str(error.value)
    assert not marker.exists()


def test_torch_zip_checkpoint_named_safetensors_is_refused(tmp_path):
    path = tmp_path / "zip.safetensors"
    torch.save({"lora_unet_x.lora_down.weight": torch.zeros(1, 1)}, path)  # torch's zip container, pickle inside
    with pytest.raises(L.LoraFormatError, match="pickle-based"):
        L.read_lora(path)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_damaged_safetensors_is_a_clear_error_naming_the_file(tmp_path, damage):
    path = _write(tmp_path / "flash.safetensors", {"lora_unet_a.lora_down.weight": torch.ones(4, 64),
                                                   "lora_unet_a.lora_up.weight": torch.ones(64, 4)})
    data = path.read_bytes()
    path.write_bytes({"truncated": data[: len(data) // 2], "garbage": b"\x10\x00\x00\x00\x00\x00\x00\x00{nope",
                      "empty": b""}[damage])
    what = r"is empty \(0 bytes\).*re-download it" if damage == "empty" else \
        r"is not a valid \.safetensors file \(truncated or corrupt\): re-download it"
    with pytest.raises(L.LoraFormatError, match=rf"flash\.safetensors' {what}"):
        L.read_lora(path)


def test_missing_file_and_non_lora_files_are_clear_errors(tmp_path):
    with pytest.raises(L.LoraFormatError, match="does not exist"):
        L.read_lora(tmp_path / "nope.safetensors")
    checkpoint = _write(tmp_path / "ckpt.safetensors", {"model.diffusion_model.out.2.weight": torch.zeros(4, 4)})
    with pytest.raises(L.LoraFormatError, match="not LoRA keys.*model.diffusion_model.out.2.weight"):
        L.read_lora(checkpoint)
    dora = _write(tmp_path / "dora.safetensors", {"lora_unet_a.lora_down.weight": torch.zeros(1, 2),
                                                  "lora_unet_a.lora_up.weight": torch.zeros(2, 1),
                                                  "lora_unet_a.dora_scale": torch.zeros(2, 1)})
    with pytest.raises(L.LoraFormatError, match="not a plain LoRA.*lora_unet_a.dora_scale"):
        L.read_lora(dora)
    half = _write(tmp_path / "half.safetensors", {"unet.a.lora_A.weight": torch.zeros(1, 2)})
    with pytest.raises(L.LoraFormatError, match="without both down.*unet.a"):
        L.read_lora(half)


# ---------------------------------------------------------------------------------------------------------
# Formats and alpha rules, on real SD1.5 module names
# ---------------------------------------------------------------------------------------------------------


def test_every_format_normalises_to_the_same_modules(tmp_path, sd15_layers):
    pairs = _pairs(sd15_layers, rank=2)
    flat = {p.replace(".", "_"): p for p in pairs}
    files = {
        "diffusers_lora_A": ({f"unet.{p}.lora_{ab}.weight": t for p, (a, b) in pairs.items()
                              for ab, t in (("A", a), ("B", b))}, (L.DIFFUSERS,)),
        "diffusers_lora_down": ({f"unet.{p}.lora.{ud}.weight": t for p, (a, b) in pairs.items()
                                 for ud, t in (("down", a), ("up", b))}, (L.DIFFUSERS,)),
        "peft": ({f"base_model.model.{p}.lora_{ab}.weight": t for p, (a, b) in pairs.items()
                  for ab, t in (("A", a), ("B", b))}, (L.PEFT,)),
        "kohya": ({**{f"lora_unet_{f}.lora_down.weight": pairs[p][0] for f, p in flat.items()},
                   **{f"lora_unet_{f}.lora_up.weight": pairs[p][1] for f, p in flat.items()},
                   **{f"lora_unet_{f}.alpha": torch.tensor(2.0) for f in flat}}, (L.KOHYA,)),
    }
    for name, (tensors, formats) in files.items():
        lora = L.read_lora(_write(tmp_path / f"{name}.safetensors", tensors))
        assert lora.formats == formats, name
        assert lora.warnings == [] or name == "peft"
        assert len(lora.modules) == len(pairs) == 128
        modules = {m.path: m for m in lora.modules}
        if name == "kohya":  # kohya names stay flattened; mapping them needs the model's key map
            assert set(modules) == set(flat) and all(m.flat for m in lora.modules)
            modules = {flat[k]: m for k, m in modules.items()}
        assert set(modules) == set(pairs) and {m.component for m in lora.modules} == {L.UNET}
        for path, (a, b) in pairs.items():
            module = modules[path]
            assert torch.equal(module.down, a) and torch.equal(module.up, b) and module.alpha == 2.0
        a, b = pairs[path]
        torch.testing.assert_close(modules[path].delta(), b @ a)  # alpha = rank -> scale 1


def test_text_encoder_and_attention_processor_keys():
    tensors = {
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": torch.ones(2, 8),
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight": torch.ones(8, 2),
        "text_encoder_2.text_model.encoder.layers.3.mlp.fc1.lora.down.weight": torch.ones(2, 8),
        "text_encoder_2.text_model.encoder.layers.3.mlp.fc1.lora.up.weight": torch.ones(16, 2),
        "lora_te1_text_model_encoder_layers_1_self_attn_k_proj.lora_down.weight": torch.ones(2, 8),
        "lora_te1_text_model_encoder_layers_1_self_attn_k_proj.lora_up.weight": torch.ones(8, 2),
        "unet.mid_block.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora.down.weight": torch.ones(2, 8),
        "unet.mid_block.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora.up.weight": torch.ones(8, 2),
    }
    modules = {(m.component, m.path) for m in L.parse_lora_state_dict(tensors).modules}
    assert modules == {
        (L.TEXT_ENCODER, "text_model.encoder.layers.0.self_attn.q_proj"),
        (L.TEXT_ENCODER_2, "text_model.encoder.layers.3.mlp.fc1"),
        (L.TEXT_ENCODER, "text_model_encoder_layers_1_self_attn_k_proj"),
        (L.UNET, "mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0"),
    }


def _peft_file(rank=64, alpha_paths=("a.to_q", "a.to_k")):
    generator = torch.Generator().manual_seed(0)
    tensors = {}
    for path in alpha_paths:
        tensors[f"base_model.model.{path}.lora_A.weight"] = torch.randn(rank, 16, generator=generator)
        tensors[f"base_model.model.{path}.lora_B.weight"] = torch.randn(16, rank, generator=generator)
    return tensors


def test_peft_alpha_comes_from_adapter_config_next_to_the_file(tmp_path):
    """flash-pixart / flash-sd3: r 64, lora_alpha 8 -> scale 0.125; without the config alpha = rank + warning."""
    folder = tmp_path / "flash-pixart"
    folder.mkdir()
    path = _write(folder / "adapter_model.safetensors", _peft_file())
    lora = L.read_lora(path)
    assert [m.scale for m in lora.modules] == [1.0, 1.0]
    assert len(lora.warnings) == 1 and "adapter_config.json" in lora.warnings[0] and "0.125" in lora.warnings[0]

    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 64, "lora_alpha": 8}))
    lora = L.read_lora(path)
    assert [m.scale for m in lora.modules] == [0.125, 0.125] and lora.warnings == []
    torch.testing.assert_close(lora.modules[0].delta(), 0.125 * lora.modules[0].up @ lora.modules[0].down)

    # several adapters in one folder: '<stem>.adapter_config.json' wins over the shared name
    (folder / "adapter_model.adapter_config.json").write_text(json.dumps({"r": 64, "lora_alpha": 32}))
    assert [m.scale for m in L.read_lora(path).modules] == [0.5, 0.5]

    # the shared adapter_config.json does not rescale a diffusers-format LoRA that sits in the same folder
    diffusers = {k.replace("base_model.model.", "unet."): v for k, v in _peft_file().items()}
    other = L.read_lora(_write(folder / "flash-sd.safetensors", diffusers))
    assert [m.scale for m in other.modules] == [1.0, 1.0] and other.warnings == []


def test_peft_alpha_pattern_rslora_and_config_for_another_lora():
    tensors = _peft_file(rank=4)
    config = {"r": 4, "lora_alpha": 8, "alpha_pattern": {"to_k": 2}}
    scales = {m.path: m.scale for m in L.parse_lora_state_dict(tensors, adapter_config=config).modules}
    assert scales == {"a.to_q": 2.0, "a.to_k": 0.5}
    rs = L.parse_lora_state_dict(tensors, adapter_config={"r": 4, "lora_alpha": 8, "use_rslora": True})
    assert [m.scale for m in rs.modules] == pytest.approx([4.0, 4.0])  # alpha / sqrt(r)
    other = L.parse_lora_state_dict(tensors, adapter_config={"r": 128, "lora_alpha": 128})
    assert any("matches none of the file's ranks" in w for w in other.warnings)


@pytest.mark.parametrize("metadata", [
    {"lora_adapter_metadata": json.dumps({"transformer.r": 64, "transformer.lora_alpha": 8})},  # diffusers
    {"adapter_config": json.dumps({"r": 64, "lora_alpha": 8, "peft_type": "LORA"})},  # embedded config
    {"lora_alpha": "8", "r": "64"},
])
def test_alpha_from_safetensors_metadata(tmp_path, metadata):
    path = _write(tmp_path / "adapter.safetensors", _peft_file(), metadata=metadata)
    lora = L.read_lora(path)
    assert [m.scale for m in lora.modules] == [0.125, 0.125] and lora.warnings == []


def test_alpha_tensor_beats_config_and_diffusers_default_is_alpha_equals_rank():
    tensors = {"lora_unet_a.lora_down.weight": torch.ones(4, 3), "lora_unet_a.lora_up.weight": torch.ones(3, 4),
               "lora_unet_a.alpha": torch.tensor(1.0),
               "unet.b.lora_A.weight": torch.ones(4, 3), "unet.b.lora_B.weight": torch.ones(3, 4)}
    modules = {m.path: m for m in L.parse_lora_state_dict(tensors, metadata={"lora_alpha": "2"}).modules}
    assert modules["a"].scale == 0.25  # its own .alpha tensor
    assert modules["b"].scale == 0.5  # the metadata alpha
    assert {m.path: m.scale for m in L.parse_lora_state_dict(tensors).modules} == {"a": 0.25, "b": 1.0}


@pytest.mark.parametrize("config_text, fragments", [
    ('{"r": 64, "lora_alpha": 8', ["is not valid JSON", "line 1, column 26"]),
    ('{"r": "abc", "lora_alpha": 8}', ["key 'r' must be a positive integer", "'abc'"]),
    ('{"r": 64}', ["has no 'lora_alpha' key"]),
    ('{"lora_alpha": 8}', ["has no 'r' key"]),
    ('{"r": 64, "lora_alpha": "8"}', ["key 'lora_alpha' must be a number", "'8'"]),
    ('{"r": 0, "lora_alpha": 8}', ["key 'r' must be a positive integer", "got 0"]),
    ('{"r": 64, "lora_alpha": 8, "alpha_pattern": ["to_q"]}', ["key 'alpha_pattern' must be an object"]),
    ('{"r": 64, "lora_alpha": 8, "rank_pattern": {"to_q": "big"}}', ["key 'rank_pattern' must be an object"]),
    ('{"r": 64, "lora_alpha": 8, "use_rslora": "yes"}', ["key 'use_rslora' must be true or false"]),
    ('{"r": 64, "lora_alpha": 8, "peft_type": "LOHA"}', ["'peft_type' is 'LOHA'", "LoRA adapters only"]),
    ("[64, 8]", ["must hold a JSON object"]),
], ids=["bad-json", "r-string", "no-alpha", "no-r", "alpha-string", "r-zero", "alpha-pattern-list",
        "rank-pattern-values", "rslora-string", "loha", "not-object"])
def test_malformed_adapter_config_names_the_file_and_the_key(tmp_path, config_text, fragments):
    folder = tmp_path / "flash-sd3"
    folder.mkdir()
    path = _write(folder / "adapter_model.safetensors", _peft_file())
    (folder / "adapter_config.json").write_text(config_text)
    with pytest.raises(L.LoraFormatError) as error:
        L.read_lora(path)
    message = str(error.value)
    assert str(folder / "adapter_config.json") in message, message
    for fragment in fragments:
        assert fragment in message, message
    assert "adapter_config.json" in message.split("'")[1]  # the file comes first, in quotes


@pytest.mark.parametrize("metadata, fragment", [
    ({"lora_alpha": "eight"}, "metadata key 'lora_alpha' must be a number, got 'eight'"),
    ({"lora_alpha": "8", "r": "x"}, "metadata key 'r' must be a number"),
    ({"lora_adapter_metadata": json.dumps({"unet.r": 64, "unet.lora_alpha": "8"})}, "key 'lora_alpha' must be a number"),
])
def test_malformed_alpha_metadata_names_the_file_and_the_key(tmp_path, metadata, fragment):
    path = _write(tmp_path / "odd.safetensors", _peft_file(), metadata=metadata)
    with pytest.raises(L.LoraFormatError, match="'odd.safetensors': .*" + fragment.replace("(", r"\(")):
        L.read_lora(path)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_lora_is_refused_naming_the_file_and_keys(tmp_path, bad):
    tensors = _peft_file()
    key = sorted(tensors)[1]
    tensors[key] = tensors[key].clone()
    tensors[key][0, 0] = bad
    path = _write(tmp_path / "diverged.safetensors", tensors)
    with pytest.raises(L.LoraFormatError) as error:
        L.read_lora(path)
    message = str(error.value)
    assert str(path) in message and key in message and "non-finite values (NaN or Inf) in 1 of its 4 tensors" in message
    assert "from before it diverged" in message and "lower learning rate" in message  # what to do


@pytest.mark.parametrize("start", [b"\x80", b"PK"], ids=["0x80", "PK"])
def test_lora_whose_header_length_looks_like_a_pickle_or_zip_signature_loads(tmp_path, start):
    """About 3 % of valid files start like this; byte sniffing refused them as pickles."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "nodes"))
    import lora_fixtures as F

    tensors = {"lora_unet_a.lora_down.weight": torch.ones(2, 4), "lora_unet_a.lora_up.weight": torch.ones(4, 2),
               "lora_unet_a.alpha": torch.tensor(1.0)}
    path = F.safetensors_with_header_start(tmp_path / "flash.safetensors", tensors, start)
    (module,) = L.read_lora(path).modules
    assert (module.path, module.scale) == ("a", 0.5)


# ---------------------------------------------------------------------------------------------------------
# Mapping onto a model's key map
# ---------------------------------------------------------------------------------------------------------


def _sd15_key_map(sd15_layers):
    """A key map like ComfyUI's for SD1.5 (kohya-flattened diffusers names -> model weight keys)."""
    return {f"lora_unet_{p.replace('.', '_')}": f"diffusion_model.{p}.weight" for p in sd15_layers}


def test_map_lora_maps_everything_or_names_what_did_not_map(sd15_layers):
    key_map = _sd15_key_map(sd15_layers)
    shapes = {v: sd15_layers[k[len("diffusion_model."):-len(".weight")]] for v in key_map.values() for k in [v]}
    pairs = _pairs(sd15_layers, rank=1)
    tensors = {f"unet.{p}.lora_{ab}.weight": t for p, (a, b) in pairs.items() for ab, t in (("A", a), ("B", b))}
    plan = L.map_lora(L.parse_lora_state_dict(tensors, name="ok.safetensors"), key_map, None, shapes, "SD15")
    assert len(plan.unet) == 128 and {m.target for m in plan.unet} == set(key_map.values())

    extra = dict(tensors)
    extra["unet.up_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight"] = torch.ones(1, 1280)
    extra["unet.up_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight"] = torch.ones(1280, 1)
    with pytest.raises(L.LoraMappingError) as error:
        L.map_lora(L.parse_lora_state_dict(extra, name="x.safetensors"), key_map, None, shapes, "SD15")
    message = str(error.value)
    assert "2 of the 258 keys of 'x.safetensors' (1 of 129 LoRA modules)" in message
    assert "unet.up_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight" in message
    assert "SDXL LoRA" in message and "attentions in up_blocks.0" in message  # SD1.5's up_blocks.0 has none

    with pytest.raises(L.LoraMappingError, match=r"None of the 2 keys of 'z.safetensors' match this SD15 model"):
        L.map_lora(L.parse_lora_state_dict({"lora_unet_foo.lora_down.weight": torch.ones(1, 2),
                                            "lora_unet_foo.lora_up.weight": torch.ones(2, 1)}, name="z.safetensors"),
                   key_map, None, shapes, "SD15")


def test_map_lora_refuses_shape_mismatch_and_missing_clip(sd15_layers):
    key_map = _sd15_key_map(sd15_layers)
    shapes = {f"diffusion_model.{p}.weight": s for p, s in sd15_layers.items()}
    # an SD2.x-style cross-attention (1024 wide) on SD1.5's 768-wide attn2.to_k: same name, other shape
    tensors = {"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight": torch.ones(1, 1024),
               "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.lora_B.weight": torch.ones(320, 1)}
    with pytest.raises(L.LoraMappingError, match=r"by name but not by shape.*SD2\.x LoRA.*1024-wide.*SD15 model"):
        L.map_lora(L.parse_lora_state_dict(tensors), key_map, None, shapes, "SD15")
    te = {"lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.ones(1, 768),
          "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.ones(3072, 1)}
    with pytest.raises(L.LoraMappingError, match="connect the CLIP input"):
        L.map_lora(L.parse_lora_state_dict(te), key_map, None, shapes, "SD15")


def test_comfy_lora_inputs_carry_the_trained_alpha():
    module = L.LoraModule(L.UNET, "a", False, torch.ones(4, 3), torch.ones(5, 4), 2.0)
    tensors, to_load = L.comfy_lora_inputs([L.MappedModule(module, "lora_unet_a", "diffusion_model.a.weight")])
    assert to_load == {"lora_unet_a": "diffusion_model.a.weight"}
    assert tensors["lora_unet_a.alpha"].item() == 2.0 and tensors["lora_unet_a.lora_up.weight"].shape == (5, 4)


# ---------------------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------------------


def _mixed_modules():
    generator = torch.Generator().manual_seed(1)

    def module(component, path, rank, alpha, fan_in=6, fan_out=5):
        return L.LoraModule(component, path, False, torch.randn(rank, fan_in, generator=generator),
                            torch.randn(fan_out, rank, generator=generator), alpha)

    return [
        module(L.UNET, "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", 4, 4.0),
        module(L.UNET, "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k", 4, 1.0),
        module(L.UNET, "mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0", 2, 4.0),
        module(L.TEXT_ENCODER, "text_model.encoder.layers.0.self_attn.q_proj", 4, 4.0),
    ]


def _same_updates(a: list[L.LoraModule], b: list[L.LoraModule]):
    assert len(a) == len(b)
    for x, y in zip(sorted(a, key=lambda m: (m.component, m.path)), sorted(b, key=lambda m: (m.component, m.path))):
        assert x.component == y.component
        torch.testing.assert_close(x.delta(), y.delta())


def test_kohya_and_diffusers_exports_round_trip_with_their_alphas(tmp_path):
    modules = _mixed_modules()
    kohya = L.to_kohya_state_dict(modules)
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.alpha" in kohya
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight" in kohya
    L.save_lora(tmp_path / "kohya.safetensors", kohya)
    _same_updates(L.read_lora(tmp_path / "kohya.safetensors").modules, modules)

    tensors, metadata = L.to_diffusers_state_dict(modules)
    assert "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0.lora_B.weight" in tensors
    L.save_lora(tmp_path / "diffusers.safetensors", tensors, metadata)
    back = L.read_lora(tmp_path / "diffusers.safetensors")
    assert back.formats == (L.DIFFUSERS,) and back.warnings == []
    _same_updates(back.modules, modules)


def test_peft_export_loads_in_peft_with_the_same_scales(tmp_path):
    """save_peft_adapter writes what PEFT itself loads: the injected layers compute W x + (alpha/r) B A x."""
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict

    modules = [m for m in _mixed_modules() if m.component == L.UNET]
    weights, config_path = L.save_peft_adapter(tmp_path / "adapter", modules)
    assert L.read_lora(weights).warnings == []
    _same_updates(L.read_lora(weights).modules, modules)

    net = torch.nn.Module()
    for m in modules:  # build a module tree with the same paths
        parent = net
        *parents, leaf = m.path.split(".")
        for part in parents:
            if not hasattr(parent, part):
                parent.add_module(part, torch.nn.Module())
            parent = getattr(parent, part)
        parent.add_module(leaf, torch.nn.Linear(6, 5, bias=False))
    reference = {m.path: net.get_submodule(m.path).weight.detach().clone() for m in modules}
    config = LoraConfig(**{k: v for k, v in json.loads(Path(config_path).read_text()).items() if k != "peft_type"})
    inject_adapter_in_model(config, net)
    from safetensors.torch import load_file

    state = {k[len("base_model.model."):]: v for k, v in load_file(weights).items()}
    result = set_peft_model_state_dict(net, state)
    assert not result.unexpected_keys
    x = torch.randn(3, 6)
    for m in modules:
        expected = x @ (reference[m.path] + m.delta()).T  # W + (alpha / r) B A
        torch.testing.assert_close(net.get_submodule(m.path)(x), expected, rtol=1e-5, atol=1e-5)


def test_save_lora_is_atomic_and_safetensors_only(tmp_path):
    path = tmp_path / "out" / "lora.safetensors"
    L.save_lora(path, {"a.lora_down.weight": torch.ones(1, 2)})
    L.save_lora(path, {"b.lora_down.weight": torch.ones(1, 2)}, {"note": "second"})
    assert os.listdir(path.parent) == ["lora.safetensors"]  # replaced in place, no temporary left behind
    tensors, metadata = L.load_safetensors(path)
    assert list(tensors) == ["b.lora_down.weight"] and metadata["note"] == "second"
    with pytest.raises(ValueError, match=".safetensors"):
        L.save_lora(tmp_path / "lora.ckpt", {"a": torch.ones(1)})
    with pytest.raises(AttributeError):
        L.save_lora(path, {"bad": "not a tensor"})  # a failed write leaves the old file intact
    assert list(L.load_safetensors(path)[0]) == ["b.lora_down.weight"]
    assert os.listdir(path.parent) == ["lora.safetensors"]


def test_modules_from_trained_peft_state_dict_for_the_trainer():
    state = {"down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": torch.ones(8, 4),
             "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight": torch.ones(4, 8)}
    (module,) = L.modules_from_peft_state_dict(state, lora_alpha=4.0)
    assert (module.component, module.path, module.scale) == (
        L.UNET, "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", 0.5)
    kohya = L.to_kohya_state_dict([module])
    assert kohya["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.alpha"].item() == 4.0
    with pytest.raises(ValueError, match="kohya-flattened"):
        L.to_diffusers_state_dict(L.parse_lora_state_dict(kohya).modules)


def test_rename_modules_between_ldm_and_diffusers_paths():
    """A LoRA trained on ComfyUI's UNetModel (LDM paths) exports with diffusers paths through a weight map."""
    diffusers_to_ldm = {  # the shape of comfy.utils.unet_to_diffusers(unet_config)
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight":
            "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight",
        "down_blocks.0.attentions.0.proj_in.bias": "input_blocks.1.1.proj_in.bias",
    }
    ldm = L.LoraModule(L.UNET, "input_blocks.1.1.transformer_blocks.0.attn1.to_q", False,
                       torch.ones(2, 3), torch.ones(3, 2), 1.0)
    (renamed,) = L.rename_modules([ldm], L.module_path_map(diffusers_to_ldm, invert=True))
    assert renamed.path == "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    assert torch.equal(renamed.delta(), ldm.delta())
    tensors, _ = L.to_diffusers_state_dict([renamed])
    assert "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight" in tensors
    with pytest.raises(ValueError, match="no entry in the path map.*input_blocks.1.1"):
        L.rename_modules([ldm], {})
