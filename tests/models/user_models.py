"""Models written the way users write them, including broken ones, for CLI tests."""

import torch
from torch import nn


class TwoLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 12)
        self.fc2 = nn.Linear(12, 3)

    def forward(self, x):
        return {"logits": self.fc2(torch.relu(self.fc1(x))), "features": self.fc1(x)}


def good():
    torch.manual_seed(0)
    return TwoLayer().eval(), (torch.randn(2, 6),)


def with_attribute():
    model = TwoLayer().eval()
    model.example_inputs = (torch.randn(2, 6),)
    return model


def raises():
    raise RuntimeError("checkpoint not found")


def wrong_return():
    return "not a model"


def wrong_inputs():
    return TwoLayer().eval(), (torch.randn(2, 6), torch.randn(2, 6))


def wrong_shape():
    return TwoLayer().eval(), (torch.randn(2, 5),)


class DataDependent(nn.Module):
    def forward(self, x):
        if x.sum() > 0:
            return x * 2
        return x - 1


def data_dependent():
    return DataDependent(), (torch.randn(2, 3),)


class Stateful(nn.Module):
    """Its output depends on how often it was called: no export can reproduce that."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return x * self.calls


def stateful():
    return Stateful(), (torch.randn(2, 3),)


class ArgmaxHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 5)

    def forward(self, x):
        scores = self.fc(x)
        return scores, scores.argmax(dim=-1), scores > 0


def argmax_head():
    torch.manual_seed(0)
    return ArgmaxHead().eval(), (torch.randn(3, 4),)


class BagOfWords(nn.Module):
    """A recommender-style model: EmbeddingBag (mean over each row of ids) and a linear head."""

    def __init__(self):
        super().__init__()
        self.bag = nn.EmbeddingBag(50, 8, mode="mean")
        self.head = nn.Linear(8, 2)

    def forward(self, ids):
        return self.head(self.bag(ids))


def bag_of_words():
    torch.manual_seed(0)
    return BagOfWords().eval(), (torch.randint(0, 50, (3, 6)),)


class Bucketize(nn.Module):
    """Uses torch.searchsorted, which the StableHLO lowering does not cover."""

    def __init__(self):
        super().__init__()
        self.register_buffer("edges", torch.tensor([-1.0, 0.0, 1.0]))
        self.scale = nn.Linear(4, 4)

    def forward(self, x):
        return torch.searchsorted(self.edges, self.scale(x).contiguous())


def bucketize():
    return Bucketize().eval(), (torch.randn(2, 4),)


class ImagesOnly(nn.Module):
    """A forward whose own check fails on the example: a bare `assert`, whose AssertionError says nothing."""

    def forward(self, x):
        assert x.dim() == 4
        return x * 2


def failing_assert():
    return ImagesOnly(), (torch.randn(2, 3),)
