"""ComfyUI entry point of Flash for ComfyUI (V3 node API).

Guarded like city96/ComfyUI-GGUF: importing this folder outside ComfyUI (tests, `import flash_core`,
the headless trainer) must not fail, so the ComfyUI glue is only imported when ComfyUI is there.
"""

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    # nodes/ import `flash_core` absolutely; a git clone into custom_nodes/ has no pip install of it.
    # Appended, never prepended: our `nodes/` package must not shadow ComfyUI's top-level `nodes` module.
    sys.path.append(_HERE)

try:
    import comfy_api.latest  # noqa: F401  (present only inside ComfyUI)
except ImportError:  # pragma: no cover - outside ComfyUI
    comfy_entrypoint = None
else:
    from .nodes import comfy_entrypoint  # noqa: F401

WEB_DIRECTORY = "./web"  # web/flash_stack.js: the stack-mismatch warning toast of FlashSampler
__all__ = ["comfy_entrypoint"]
