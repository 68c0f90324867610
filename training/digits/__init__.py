"""Digits: a self-trained text-to-image teacher (scikit-learn's handwritten digits) to prove Flash distillation.

data.py (corpus and prompts), teacher.py (diffusers pipeline folder), evaluator.py (accuracy and Fréchet
distance in a digit classifier's features), benchmark.py (`make bench-quality`), demo.py (`make demo`),
gallery.py (the workflow images of docs/usage.md), stack.py and style.py.
"""
