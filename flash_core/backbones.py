"""The model families Flash Diffusion distils: the ONE registry of the facts that differ between them outside
the training recipe (flash_core/recipes.py holds rank, guidance, K and the loss weights per phase).

Every front end reads it: the CLI (which backbones a config may name, the diffusers network class and subfolder
of a teacher folder), the ComfyUI node (which ComfyUI model configs it trains), the LoRA export (the denoiser's
key prefix) and the file metadata (the base-model tag LoRA managers show). Adding a model family means one
`Backbone` here, one `Recipe` in recipes.py and a Denoiser in flash_core/backends/.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Backbone:
    name: str  # the recipe key ("sd15", ...), used in configs, file metadata and the node
    network_class: str  # the diffusers class of the denoising network
    subfolder: str  # its pipeline subfolder, also diffusers' LoRA key prefix: "unet" | "transformer"
    prediction_type: str  # what the network predicts: "epsilon" | "flow" (UNet folders may declare v_prediction)
    base_model_version: str  # ss_base_model_version in the LoRA files (kohya's tags, which LoRA managers read)
    comfy_configs: tuple[str, ...] = ()  # comfy.supported_models classes FlashDistillTrain trains (and subclasses)

    @property
    def is_dit(self) -> bool:
        """A diffusion transformer: no encoder / decoder split (its discriminator reads the final output map)."""
        return self.subfolder == "transformer"

    def network(self) -> type:
        """The diffusers network class (imported on demand: diffusers is heavy)."""
        import diffusers

        return getattr(diffusers, self.network_class)


BACKBONES: dict[str, Backbone] = {
    b.name: b
    for b in (
        Backbone("sd15", "UNet2DConditionModel", "unet", "epsilon", "sd_v1", comfy_configs=("SD15",)),
        # SSD-1B, Segmind Vega and KOALA subclass ComfyUI's SDXL config: SDXL-shaped, trained as SDXL
        Backbone("sdxl", "UNet2DConditionModel", "unet", "epsilon", "sdxl_base_v1-0", comfy_configs=("SDXL",)),
        Backbone("pixart", "PixArtTransformer2DModel", "transformer", "epsilon", "pixart"),
        Backbone("sd3", "SD3Transformer2DModel", "transformer", "flow", "sd3"),
    )
}


def get_backbone(name: str) -> Backbone:
    """The registered backbone `name`, or a KeyError naming the known ones."""
    try:
        return BACKBONES[name]
    except KeyError:
        raise KeyError(
            f"unknown backbone {name!r}: known backbones are {', '.join(BACKBONES)} "
            "(a new model family needs a Backbone in flash_core/backbones.py and a Recipe in flash_core/recipes.py)"
        ) from None
