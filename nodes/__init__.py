"""ComfyUI glue: one module per node family, each exposing NODES (a list of io.ComfyNode classes).

Node ids are stable forever: workflows saved by users refer to them.
"""

from comfy_api.latest import ComfyExtension, io

from . import loaders, pipelines, sampling, training

NODE_MODULES = (sampling, loaders, training, pipelines)


class FlashExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [node for module in NODE_MODULES for node in module.NODES]


async def comfy_entrypoint() -> FlashExtension:
    return FlashExtension()
