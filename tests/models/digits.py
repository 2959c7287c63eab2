"""A small CNN trained on scikit-learn's digits (8x8 images shipped with the package), for int8 accuracy tests."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


class DigitsCNN(nn.Module):
    """Two convolutions and a linear classifier over 1x8x8 digit images."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
        )
        self.classifier = nn.Linear(32 * 4 * 4, 10)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(image).flatten(1))


def digits_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Train and held-out images ([N, 1, 8, 8] float32 in 0..1) and labels, a fixed 75/25 split."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = (data.images / 16.0).astype(np.float32)[:, None]
    order = np.random.default_rng(0).permutation(len(images))
    cut = int(0.75 * len(images))
    train, test = order[:cut], order[cut:]
    return images[train], data.target[train], images[test], data.target[test]


def trained_digits_cnn(epochs: int = 12) -> tuple[nn.Module, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The CNN trained on the train split; returns (model, train_x, train_y, test_x, test_y)."""
    train_x, train_y, test_x, test_y = digits_split()
    torch.manual_seed(0)
    model = DigitsCNN()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    inputs, labels = torch.from_numpy(train_x), torch.from_numpy(train_y).long()
    generator = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        for batch in torch.randperm(len(inputs), generator=generator).split(64):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(inputs[batch]), labels[batch]).backward()
            optimizer.step()
    return model.eval(), train_x, train_y, test_x, test_y


def accuracy(predict, images: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of images whose argmax prediction equals the label; `predict` maps [1,1,8,8] to logits."""
    correct = sum(int(np.argmax(predict(image[None])) == label) for image, label in zip(images, labels))
    return correct / len(labels)
