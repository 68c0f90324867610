"""FlashDiffusersLoader: MODEL, CLIP and VAE from a diffusers-format SD-family pipeline folder of any size.

The node is a thin shell over the pipeline reader, kept apart from it as city96/ComfyUI-GGUF keeps its nodes
apart from its file reader: diffusers_folder.py finds and reads the pipeline folders (and refuses what it cannot
load), diffusers_convert.py translates their configs and weight names into ComfyUI's, diffusers_build.py builds
ComfyUI's MODEL, CLIP and VAE from them (load_pipeline).
"""

from __future__ import annotations

import folder_paths
from comfy_api.latest import io

from .diffusers_build import load_pipeline
from .diffusers_folder import NODE, list_pipelines, resolve_pipeline

CATEGORY = "Flash Diffusion"


class FlashDiffusersLoader(io.ComfyNode):
    """MODEL, CLIP and VAE from a diffusers SD-family pipeline folder of any size."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FlashDiffusersLoader",
            display_name=NODE,
            category=CATEGORY,
            description=(
                "Loads a diffusers-format Stable Diffusion pipeline folder (the layout of "
                "StableDiffusionPipeline.save_pretrained, .safetensors weights) of any size from the models/diffusers "
                "folders, building the UNet, CLIP text encoder and VAE from the folder's own configs. Small or "
                "custom-sized SD1.x/SD2.x models that Load Checkpoint does not recognise load here; SDXL and "
                "transformer pipelines are refused with a pointer to ComfyUI's own loaders."
            ),
            inputs=[
                io.Combo.Input("pipeline", options=list_pipelines(),
                               tooltip="A folder with a model_index.json under models/diffusers."),
            ],
            outputs=[
                io.Model.Output(tooltip="The UNet, with SD's standard weight names (LoRAs and model patches apply)."),
                io.Clip.Output(tooltip="The CLIP text encoder with the pipeline's tokenizer."),
                io.Vae.Output(tooltip="The VAE; it scales images by 2^(levels - 1) (8 for SD's VAE)."),
            ],
        )

    @classmethod
    def execute(cls, pipeline: str) -> io.NodeOutput:
        folder = resolve_pipeline(pipeline)
        model, clip, vae = load_pipeline(folder, embedding_directory=folder_paths.get_folder_paths("embeddings"))
        return io.NodeOutput(model, clip, vae)


NODES = [FlashDiffusersLoader]
