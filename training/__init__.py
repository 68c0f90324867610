"""Headless side of Flash for ComfyUI: the distillation CLI (`flash-distill`), its data and configs.

digits/ is the embedded default (teacher, data, evaluator, benchmark, demo, gallery); fixtures/ holds what the
tests, the demo, the benchmarks and workflows/regenerate.py share (tiny models, the ComfyUI server runner).
"""
