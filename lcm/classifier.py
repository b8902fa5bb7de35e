"""The digit classifier that judges the mini teacher and its distilled students, and the Fréchet distance on its features.

A small CNN trained on the train split of `lcm.digits` at the generation resolution (16 px); its penultimate features
play the role Inception-v3's pool features play in FID (Heusel et al. 2017, arXiv:1706.08500): `frechet_distance` of
two feature sets is ‖μ_a − μ_b‖² + tr(Σ_a + Σ_b − 2 (Σ_a^½ Σ_b Σ_a^½)^½). Weights ship in
`lcm/assets/digit_classifier.safetensors`, written by `scripts/train_mini_teacher.py`.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

CLASSIFIER_PATH = Path(__file__).parent / "assets" / "digit_classifier.safetensors"


class DigitClassifier(nn.Module):
    """conv(32)×2 → pool → conv(64)×2 → pool → fc(feature_dim) → fc(10) on the channel mean of a [-1, 1] image.

    Digits are grey, so the network sees the channel mean: a slight colour cast in generated samples is not what we
    want to measure, the digit's shape is.
    """

    def __init__(self, size: int = 16, feature_dim: int = 64, dropout: float = 0.3):
        super().__init__()
        self.size, self.feature_dim = size, feature_dim
        self.conv = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
            nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
        )  # fmt: skip
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(64 * (size // 4) ** 2, feature_dim), nn.ReLU())
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(feature_dim, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features (B, feature_dim) of images (B, C, size, size) in [-1, 1]: the Fréchet distance's space."""
        if x.shape[-2:] != (self.size, self.size):
            raise ValueError(f"classifier expects {self.size}×{self.size} images, got {tuple(x.shape[-2:])}")
        return self.fc(self.conv(x.mean(dim=1, keepdim=True)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, 10)."""
        return self.head(self.dropout(self.features(x)))


def save_classifier(model: DigitClassifier, path=CLASSIFIER_PATH) -> Path:
    """Save weights with the architecture's sizes in the safetensors metadata."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().float().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata={"size": str(model.size), "feature_dim": str(model.feature_dim)})
    return path


def load_classifier(path=CLASSIFIER_PATH) -> DigitClassifier:
    """The shipped classifier (or one saved by `save_classifier`), in eval mode, fp32, on CPU."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    model = DigitClassifier(size=int(meta.get("size", 16)), feature_dim=int(meta.get("feature_dim", 64)))
    model.load_state_dict(load_file(str(path)))
    return model.eval().requires_grad_(False)


@lru_cache(maxsize=1)
def _default_classifier() -> DigitClassifier:
    return load_classifier()


def _batched(fn, images: torch.Tensor, batch: int = 500) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([fn(images[i : i + batch].float().cpu()) for i in range(0, len(images), batch)])


def classify(images: torch.Tensor, classifier: DigitClassifier | None = None) -> torch.Tensor:
    """Predicted digit (B,) of images (B, 3, H, W) in [-1, 1]."""
    model = classifier or _default_classifier()
    return _batched(model, images).argmax(dim=1)


def digit_features(images: torch.Tensor, classifier: DigitClassifier | None = None) -> torch.Tensor:
    """Penultimate features (B, feature_dim) of images (B, 3, H, W) in [-1, 1]."""
    model = classifier or _default_classifier()
    return _batched(model.features, images)


def _sqrtm_psd(m: torch.Tensor) -> torch.Tensor:
    """Square root of a symmetric positive semi-definite matrix by eigen-decomposition (negative round-off clamped)."""
    evals, evecs = torch.linalg.eigh(m)
    return (evecs * evals.clamp(min=0).sqrt()) @ evecs.T


def frechet_distance(feats_a: torch.Tensor, feats_b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (N, D): ‖μ_a − μ_b‖² + tr(Σ_a + Σ_b − 2(Σ_a^½ Σ_b Σ_a^½)^½).

    Float64 throughout; the cross term uses the symmetric form Σ_a^½ Σ_b Σ_a^½, whose square root is well defined by
    `eigh`, instead of the non-symmetric Σ_a Σ_b that scipy's `sqrtm` needs.
    """
    a, b = torch.as_tensor(feats_a).double(), torch.as_tensor(feats_b).double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T).reshape(a.shape[1], -1), torch.cov(b.T).reshape(b.shape[1], -1)
    sqrt_a = _sqrtm_psd(cov_a)
    cross = sqrt_a @ cov_b @ sqrt_a
    tr_cross = torch.linalg.eigvalsh((cross + cross.T) / 2).clamp(min=0).sqrt().sum()
    fd = (mu_a - mu_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * tr_cross
    return float(fd.clamp(min=0))


def class_diversity(feats: torch.Tensor, labels: torch.Tensor) -> float:
    """Per-class mean pairwise distance of classifier features, averaged over the classes with ≥ 2 samples: the
    mode-collapse check beside FD (adversarial students can collapse within a class while FD looks fine)."""
    per_class = []
    for c in labels.unique():
        f = feats[labels == c].double()
        if len(f) < 2:
            continue
        d = torch.cdist(f, f)
        per_class.append(d.sum() / (len(f) * (len(f) - 1)))  # the zero diagonal is excluded by the count
    return float(torch.stack(per_class).mean()) if per_class else float("nan")

