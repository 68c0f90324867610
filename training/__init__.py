"""Headless side of Flash for ComfyUI: the distillation CLI, data, demo and benchmarks."""
