"""Digits: a self-trained text-to-image teacher (scikit-learn's handwritten digits) to prove Flash distillation.

data.py (corpus and prompts), teacher.py (diffusers pipeline folder), evaluator.py (accuracy and Fréchet
distance in a digit classifier's features), benchmark.py (`make bench-quality`), demo.py (`make demo`; its
parts demo_console.py, demo_workflows.py, demo_progress.py, demo_results.py), gallery.py (the workflow images of
docs/usage.md; its parts gallery_files.py, gallery_graphs.py, gallery_renderers.py), stack.py and style.py.
"""
