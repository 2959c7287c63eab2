"""The reference of every text-generation check: the user's own causal LM as transformers runs it."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from kiln.compiler.errors import UnsupportedOpError


class CausalLMReference:
    """The user's causal LM as transformers runs it: a full-sequence forward over token ids, nothing of Kiln's in
    between. `run` gives the logits at every position and the model's own KV cache (`use_cache=True`)."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.name = f"transformers {type(model).__name__} (the user's model, full-sequence forward)"

    def run(self, ids: np.ndarray) -> tuple[np.ndarray, list[tuple[np.ndarray, np.ndarray]]]:
        """Logits [rows, positions, vocab] and each layer's (keys, values) [rows, kv heads, kept, head dim]."""
        with torch.no_grad():
            out = self.model(input_ids=torch.from_numpy(np.asarray(ids, np.int64)), use_cache=True)
        layers = getattr(out.past_key_values, "layers", None)
        if layers is None:
            raise UnsupportedOpError(
                f"{type(self.model).__name__} returns no KV cache (past_key_values.layers) from a forward with "
                "use_cache=True, which the gate needs to build decoding states",
                "export it with --task forward (one full-sequence forward)",
            )
        cache = [(layer.keys.float().numpy(), layer.values.float().numpy()) for layer in layers]
        return out.logits.float().numpy(), cache

    def next_logits(self, tokens: Sequence[int]) -> np.ndarray:
        """The logits at every position of one sequence: row i predicts token i + 1."""
        return self.run(np.asarray([tokens]))[0][0]

    def continued(self, prompt: Sequence[int], length: int) -> list[int]:
        """`prompt` followed by the model's own greedy tokens up to `length` tokens, decoded by transformers with
        the model's own cache (`use_cache=True`, the cache it returns fed back)."""
        tokens = list(prompt)
        with torch.no_grad():
            out = self.model(input_ids=torch.tensor([tokens]), use_cache=True)
            while len(tokens) < length:
                tokens.append(int(torch.argmax(out.logits[0, -1])))
                if len(tokens) < length:
                    step = torch.tensor([[tokens[-1]]])
                    out = self.model(input_ids=step, past_key_values=out.past_key_values, use_cache=True)
        return tokens
