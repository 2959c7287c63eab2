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

    def continued(self, prompts: Sequence[Sequence[int]], length: int) -> list[list[int]]:
        """Each prompt followed by the model's own greedy tokens up to `length` tokens, decoded by transformers with
        the model's own cache (`use_cache=True`, the cache it returns fed back). Each prompt is continued alone up to
        the longest prompt's length, then all of them together, a row each (the same positions in every row: no
        padding, no mask), so that a 3B model decodes about a third as many steps."""
        common = min(length, max(len(prompt) for prompt in prompts))
        rows = [self._greedy([list(prompt)], common)[0] for prompt in prompts]
        return self._greedy(rows, length)

    def _greedy(self, rows: list[list[int]], length: int) -> list[list[int]]:
        """Rows of equal length continued together by greedy decoding to `length` tokens."""
        if len(rows[0]) >= length:
            return rows
        with torch.no_grad():
            out = self.model(input_ids=torch.tensor(rows), use_cache=True)
            while True:
                chosen = torch.argmax(out.logits[:, -1], dim=-1)
                rows = [[*row, int(token)] for row, token in zip(rows, chosen)]
                if len(rows[0]) >= length:
                    return rows
                step = chosen[:, None]
                out = self.model(input_ids=step, past_key_values=out.past_key_values, use_cache=True)
