"""Models for the conversion-matrix tests: a tiny good one, and ones whose conversion really crashes, hangs,
runs out of memory or cannot reach parity. The bad behaviour happens only while torch.export traces the model
(eager PyTorch runs them fine), i.e. inside the converter, in the cell's process."""

import os
import signal
import time

import numpy as np
import torch
from torch import nn


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 4)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def tiny():
    torch.manual_seed(0)
    return Tiny().eval(), (torch.randn(2, 8),)


class CrashesWhenExported(Tiny):
    def forward(self, x):
        if torch.compiler.is_exporting():
            os.kill(os.getpid(), signal.SIGSEGV)  # a converter segfaulting
        return super().forward(x)


def crash():
    torch.manual_seed(0)
    return CrashesWhenExported().eval(), (torch.randn(2, 8),)


class HangsWhenExported(Tiny):
    def forward(self, x):
        if torch.compiler.is_exporting():
            time.sleep(3600)  # a converter stuck in a loop
        return super().forward(x)


def hang():
    torch.manual_seed(0)
    return HangsWhenExported().eval(), (torch.randn(2, 8),)


def memory_hog():
    """Maps 8 GiB (without touching it): fine without a limit, a MemoryError under a smaller address-space limit."""
    hog = np.empty(8 * 2**30, dtype=np.uint8)
    model = Tiny().eval()
    model.hog = hog
    return model, (torch.randn(2, 8),)


class Drifting(Tiny):
    """Its output depends on how often it was called: no artifact can match it, every conversion fails parity."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return super().forward(x) + self.calls


def drifting():
    torch.manual_seed(0)
    return Drifting().eval(), (torch.randn(2, 8),)
