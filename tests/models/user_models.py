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
