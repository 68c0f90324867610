"""Flash Distill Train refuses non-finite settings before any work, in ComfyUI's error panel (ComfyUI's min/max
checks let NaN through /prompt, and the weight inputs are text): issue 23, second round."""

from __future__ import annotations

import pytest

from tests.nodes.test_training import loras_dir, node_inputs, pack, run_node, small_case, training  # noqa: F401 (fixtures)

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.mark.parametrize("inputs, needle", [
    ({"learning_rate": float("nan")}, r"lr \(the learning rate\) must be a finite number > 0, got nan"),
    ({"distill_weights": "1, inf, 1, 1"}, r"distill_weights needs one weight per phase \(4\), each >= 0 and finite"),
    ({"dmd_weights": "nan"}, r"dmd_weights needs one weight per phase \(4\), each >= 0 and finite"),
    ({"guidance_min": 0.0, "guidance_max": float("inf")}, r"guidance_range must be .* both finite, got \(0.0, inf\)"),
    ({"ema_decay": float("nan")}, r"ema_decay must be 0 \(off\) or between 0 and 1 \(e.g. 0.99\), got nan"),
    ({"ema_decay": 1.0}, r"ema_decay must be 0 \(off\) or between 0 and 1 \(e.g. 0.99\), got 1.0"),
], ids=["nan-lr", "inf-distill-weight", "nan-dmd-weight", "inf-guidance", "nan-ema", "ema-1"])
def test_non_finite_settings_are_refused_before_any_work(training, small_case, loras_dir, inputs, needle):
    model, latents, prompts = small_case
    with pytest.raises(ValueError, match=rf"Flash Distill Train: .*{needle}"):
        run_node(training, **node_inputs(model, latents, prompts, **inputs))
    assert not (loras_dir / "flash").exists()  # nothing made, nothing locked
