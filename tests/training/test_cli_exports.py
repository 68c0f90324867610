"""flash-distill's export config: a format a backbone cannot be written in is refused before any work, with
the reason (PixArt has no diffusers LoRA loader); every other backbone offers every format."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]


def _raw(tmp_path: Path, backbone: str, **overrides) -> dict:
    raw = yaml.safe_load((REPO_ROOT / "training" / "configs" / f"{backbone}.yaml").read_text(encoding="utf-8"))
    (tmp_path / "model").mkdir(exist_ok=True)
    (tmp_path / "model" / "model_index.json").write_text('{"_class_name": "DiffusionPipeline"}')
    (tmp_path / "data").mkdir(exist_ok=True)
    raw["model"]["path"] = str(tmp_path / "model")
    raw["data"]["path"] = str(tmp_path / "data")
    raw.update(overrides)
    return raw


def test_pixart_diffusers_export_is_a_config_error_with_the_reason(tmp_path):
    from training.cli.config import validate_config
    from training.cli.errors import ConfigError

    with pytest.raises(ConfigError) as error:
        validate_config(_raw(tmp_path, "pixart", export=["comfyui", "diffusers"]), Path("pixart.yaml"))
    message = str(error.value)
    assert message.startswith("pixart.yaml") and "export" in message
    assert "'diffusers' is not available for pixart: diffusers has no LoRA loader for PixArt" in message
    assert "export peft instead" in message


@pytest.mark.parametrize("backbone, formats", [
    ("pixart", ["comfyui", "peft"]), ("sd3", ["comfyui", "diffusers", "peft"]),
    ("sdxl", ["comfyui", "diffusers", "peft"]), ("sd15", ["comfyui", "diffusers", "peft"]),
])
def test_default_exports_are_every_format_the_backbone_offers(tmp_path, backbone, formats):
    from training.cli.config import validate_config

    raw = _raw(tmp_path, backbone)
    raw.pop("export")
    assert validate_config(raw, Path(f"{backbone}.yaml")).export == formats


def test_unknown_export_format_is_a_config_error(tmp_path):
    from training.cli.config import validate_config
    from training.cli.errors import ConfigError

    with pytest.raises(ConfigError, match=r"export: unknown LoRA export format 'kohya': use one of comfyui, "
                                          r"diffusers, peft"):
        validate_config(_raw(tmp_path, "sd3", export=["kohya"]), Path("sd3.yaml"))
    with pytest.raises(ConfigError, match="export must be a list"):
        validate_config(_raw(tmp_path, "sd3", export="comfyui"), Path("sd3.yaml"))
