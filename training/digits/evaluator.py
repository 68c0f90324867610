"""Quality metrics for generated digits: a classifier trained on the real digits.

  * accuracy(images, digits): fraction of images the classifier reads as the prompted digit
    (our analogue of a CLIP score: does the image follow the prompt?).
  * frechet_distance(images, reference_images): Fréchet distance between Gaussians fitted to the
    classifier's penultimate features (our analogue of FID: does the image set look like real digits?).

The classifier is a tiny CNN on grey 16x16 images (the data module's resolution), trained on the train
split with +-1 pixel shifts, cached as safetensors under $FLASH_CACHE_DIR/digits/ (no pickles).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from flash_core.files import write_atomic, write_text_atomic
from training.fixtures.comfy_env import cache_dir
from training.digits.data import IMAGE_SIZE, load_splits, to_grey

CLASSIFIER_VERSION = 1
FEATURE_DIM = 64


class DigitClassifier(nn.Module):
    """conv(16) -> pool -> conv(32) -> pool -> fc(64) [features] -> fc(10), on (N, 1, 16, 16) in [-1, 1]."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc1 = nn.Linear(32 * (IMAGE_SIZE // 4) ** 2, FEATURE_DIM)
        self.fc2 = nn.Linear(FEATURE_DIM, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return F.relu(self.fc1(x.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.features(x))


def _cache_dir() -> Path:
    return cache_dir() / "digits"


def prepare(images: torch.Tensor) -> torch.Tensor:
    """Any (N, C, H, W) image batch in [-1, 1] -> grey (N, 1, 16, 16) float32."""
    x = to_grey(images.detach().float().cpu())
    if x.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
        x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False, antialias=True)
    return x.clamp(-1.0, 1.0)


def _random_shift(x: torch.Tensor, gen: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    """Translate each image by up to max_shift pixels (background -1 fills the gap)."""
    padded = F.pad(x, (max_shift,) * 4, value=-1.0)
    out = torch.empty_like(x)
    offsets = torch.randint(0, 2 * max_shift + 1, (x.shape[0], 2), generator=gen)
    size = x.shape[-1]
    for dy in range(2 * max_shift + 1):
        for dx in range(2 * max_shift + 1):
            chosen = (offsets[:, 0] == dy) & (offsets[:, 1] == dx)
            out[chosen] = padded[chosen, :, dy : dy + size, dx : dx + size]
    return out


@contextlib.contextmanager
def _single_thread():
    """Tiny CNN: one intra-op thread is fastest, and far faster than two on a busy 2-core machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def train_classifier(epochs: int = 30, seed: int = 0) -> tuple[DigitClassifier, float]:
    """Train on the train split; returns (model, held-out accuracy)."""
    with _single_thread():
        return _train_classifier(epochs, seed)


def _train_classifier(epochs: int, seed: int) -> tuple[DigitClassifier, float]:
    train, held_out = load_splits()
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = DigitClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    x_all, y_all = prepare(train.images), train.digits
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(y_all), generator=gen)
        for start in range(0, len(order), 64):
            idx = order[start : start + 64]
            loss = F.cross_entropy(model(_random_shift(x_all[idx], gen)), y_all[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        held_acc = float((model(prepare(held_out.images)).argmax(1) == held_out.digits).float().mean())
    return model, held_acc


class DigitEvaluator:
    """Accuracy and Fréchet distance of generated digit images, via a trained DigitClassifier."""

    def __init__(self, model: DigitClassifier, held_out_accuracy: float) -> None:
        self.model = model.eval()
        self.held_out_accuracy = held_out_accuracy

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> np.ndarray:
        """Penultimate-layer features (N, 64), float64."""
        return self.model.features(prepare(images)).double().numpy()

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(prepare(images)).argmax(1)

    def accuracy(self, images: torch.Tensor, digits) -> float:
        """Fraction of images classified as their prompted digit."""
        digits = torch.as_tensor(digits, dtype=torch.int64)
        return float((self.predict(images) == digits).float().mean())

    def frechet_distance(self, images: torch.Tensor, reference_images: torch.Tensor) -> float:
        """Fréchet distance between feature Gaussians of the two image sets (FID formula)."""
        return frechet_distance_from_features(self.features(images), self.features(reference_images))


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    """Symmetric square root of a positive semi-definite matrix (eigen-decomposition)."""
    eigvals, eigvecs = np.linalg.eigh(matrix)
    return (eigvecs * np.sqrt(np.clip(eigvals, 0.0, None))) @ eigvecs.T


def frechet_distance_from_features(a: np.ndarray, b: np.ndarray) -> float:
    """d^2 = ||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2))  (Fréchet / FID).

    Tr (S_a S_b)^(1/2) = Tr (S_a^(1/2) S_b S_a^(1/2))^(1/2): symmetric, so eigen-based and stable even
    when a covariance is singular (dead ReLU features).
    """
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root_a = _psd_sqrt(cov_a)
    middle = root_a @ cov_b @ root_a  # S_a^(1/2) S_b S_a^(1/2), same spectrum as S_a S_b
    trace_covmean = float(np.sqrt(np.clip(np.linalg.eigvalsh(middle), 0.0, None)).sum())
    value = float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2.0 * trace_covmean)
    return max(value, 0.0)


def load_evaluator(cache_dir: Path | None = None, retrain: bool = False) -> DigitEvaluator:
    """The cached classifier (trained and saved on first use, a few seconds)."""
    from safetensors.torch import load_file, save_file

    folder = Path(cache_dir) if cache_dir is not None else _cache_dir()
    weights = folder / f"classifier-v{CLASSIFIER_VERSION}.safetensors"
    info = folder / f"classifier-v{CLASSIFIER_VERSION}.json"
    if weights.is_file() and info.is_file() and not retrain:
        model = DigitClassifier()
        model.load_state_dict(load_file(str(weights)))
        return DigitEvaluator(model, json.loads(info.read_text())["held_out_accuracy"])
    model, held_acc = train_classifier()
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    write_atomic(weights, lambda tmp: save_file(state, tmp))
    # the info file last: it marks the pair complete (a crash in between leaves weights without info: retrained)
    write_text_atomic(info, json.dumps({"held_out_accuracy": held_acc, "version": CLASSIFIER_VERSION}))
    return DigitEvaluator(model, held_acc)


_DEFAULT: DigitEvaluator | None = None


def _default() -> DigitEvaluator:
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = load_evaluator()
    return _DEFAULT


def accuracy(images: torch.Tensor, digits) -> float:
    """Fraction of `images` the cached classifier reads as `digits` (see DigitEvaluator.accuracy)."""
    return _default().accuracy(images, digits)


def frechet_distance(images: torch.Tensor, reference_images: torch.Tensor) -> float:
    """Fréchet distance in classifier features (see DigitEvaluator.frechet_distance)."""
    return _default().frechet_distance(images, reference_images)
