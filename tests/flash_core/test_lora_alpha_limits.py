"""LoRA alphas that cannot be applied: refused naming the file and the module, never turned into an IndexError
or a silent NaN image (issue 23, second round)."""

from __future__ import annotations

import pytest
import torch

from flash_core import lora_formats as L
from tests.flash_core.test_lora_formats import _peft_file, _write


def _kohya_file(alpha: torch.Tensor) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {"lora_unet_mid_block_attentions_0_proj_in.lora_down.weight": torch.randn(4, 64, generator=generator),
            "lora_unet_mid_block_attentions_0_proj_in.lora_up.weight": torch.randn(64, 4, generator=generator),
            "lora_unet_mid_block_attentions_0_proj_in.alpha": alpha}


def test_an_empty_alpha_tensor_is_refused_naming_the_file_and_key(tmp_path):
    path = _write(tmp_path / "empty-alpha.safetensors", _kohya_file(torch.zeros(0)))
    with pytest.raises(L.LoraFormatError) as error:  # was: IndexError from reading its first number
        L.read_lora(path)
    message = str(error.value)
    assert "empty-alpha.safetensors" in message and "lora_unet_mid_block_attentions_0_proj_in.alpha" in message
    assert "empty tensor" in message and "re-download or re-export it" in message


@pytest.mark.parametrize("alpha", [1e30, 3e38, -1e30])
def test_a_huge_finite_alpha_is_refused_not_turned_into_nan(tmp_path, alpha):
    """A finite alpha whose update overflows any model weight (it gave NaN images silently)."""
    path = _write(tmp_path / "huge-alpha.safetensors", _kohya_file(torch.tensor(alpha)))
    with pytest.raises(L.LoraFormatError) as error:
        L.read_lora(path)
    message = str(error.value)
    assert "huge-alpha.safetensors" in message and "lora_unet_mid_block_attentions_0_proj_in" in message
    assert f"alpha {alpha:g}" in message or "not a finite number" in message
    assert "NaN" in message and "re-download or re-export it" in message


def test_large_but_sane_alphas_still_load(tmp_path):
    for alpha in (1.0, 4.0, 64.0, 1024.0):  # scale alpha / rank up to 256: unusual, not broken
        lora = L.read_lora(_write(tmp_path / f"a{alpha:g}.safetensors", _kohya_file(torch.tensor(alpha))))
        assert lora.modules[0].alpha == alpha


@pytest.mark.parametrize("alpha", [1e300], ids=["config"])
def test_a_huge_alpha_from_an_adapter_config_is_refused(tmp_path, alpha):
    tensors = _peft_file()
    with pytest.raises(L.LoraFormatError, match="beyond any model weight"):
        L.parse_lora_state_dict(tensors, adapter_config={"r": 64, "lora_alpha": alpha}, name="peft.safetensors")
