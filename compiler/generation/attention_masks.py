"""Which positions each layer of a `transformers` decoder attends to, and the additive masks that say so.

A text-generation export passes the model its own attention masks (one per kind of layer), built in the graph from
the positions of the queries and of the cache slots: transformers builds a model's masks from its cache object,
and Kiln's caches are plain tensors. The masks must be the model's own, layer by layer:

- `full_attention`: a query at position q sees every key at position <= q;
- `sliding_attention`: only the last `sliding_window` of them, q - window < k <= q (transformers'
  `sliding_window_overlay`);

read from the config: its `layer_types` where it has them (Gemma 2 and 3, Qwen2/Qwen3 with `use_sliding_window`),
else every layer sliding when it declares a `sliding_window` (Mistral, Phi-3), else every layer full. What a mask
gets wrong, the gate sees: it compares the artifact with the user's own model (compiler/generation/gate.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from kiln.compiler.errors import UnsupportedOpError

FULL = "full_attention"
SLIDING = "sliding_attention"
KINDS = (FULL, SLIDING)


@dataclass(frozen=True)
class AttentionPattern:
    """The kind of each decoder layer's attention and the sliding window's length (None: no sliding layer)."""

    layer_types: tuple[str, ...]
    window: int | None = None

    @classmethod
    def of(cls, config: Any) -> AttentionPattern:
        """The pattern a transformers config declares; an UnsupportedOpError for attention Kiln does not export
        (chunked attention, unknown layer kinds), so that such a model is refused rather than published wrong."""
        layers = int(config.num_hidden_layers)
        if getattr(config, "attention_chunk_size", None):
            raise UnsupportedOpError(
                f"{type(config).__name__} declares chunked attention (attention_chunk_size="
                f"{config.attention_chunk_size}), which Kiln's text-generation export does not build",
                "export it with --task forward (one full-sequence forward)",
            )
        window = getattr(config, "sliding_window", None)
        types = tuple(getattr(config, "layer_types", None) or [SLIDING if window else FULL] * layers)
        unknown = sorted(set(types) - set(KINDS))
        if unknown or len(types) != layers:
            raise UnsupportedOpError(
                f"{type(config).__name__} has attention layers of kind {', '.join(unknown) or repr(types)}: "
                f"Kiln's text-generation export builds only {' and '.join(KINDS)} over {layers} layers",
                "export it with --task forward (one full-sequence forward)",
            )
        if SLIDING not in types:
            return cls(types)
        if not isinstance(window, int) or isinstance(window, bool) or window < 1:
            raise UnsupportedOpError(
                f"{type(config).__name__} has sliding-window layers but sliding_window={window!r}",
                "set config.sliding_window to the window's length in tokens",
            )
        return cls(types, window)

    @property
    def uniform(self) -> bool:
        """Whether every layer is of one kind (then the model takes one mask, not one per kind)."""
        return len(set(self.layer_types)) == 1

    def describe(self) -> str:
        """E.g. "full attention" or "sliding window 8 on 2 of 4 layers"."""
        sliding = self.layer_types.count(SLIDING)
        if not sliding:
            return "full attention"
        return f"sliding window {self.window} on {sliding} of {len(self.layer_types)} layers"

    def masks(
        self, query: torch.Tensor, keys: torch.Tensor, valid: torch.Tensor | None, dtype: torch.dtype
    ) -> torch.Tensor | dict[str, torch.Tensor]:
        """Additive masks [rows, 1, queries, keys]: 0 where a query at position `query` ([queries]) may see the key
        at position `keys` ([keys]) and `valid` ([rows, keys] bool, None: every key) allows, the dtype's lowest
        value elsewhere. One tensor when every layer is of one kind (what every transformers decoder takes), else
        a dict by kind (what its hybrid models take as `attention_mask`)."""
        q, k = query.view(-1, 1), keys.view(1, -1)
        seen = {FULL: k <= q}
        if self.window is not None:
            seen[SLIDING] = (k <= q) & (k > q - self.window)
        zero, lowest = torch.zeros((), dtype=dtype), torch.full((), torch.finfo(dtype).min, dtype=dtype)
        masks = {}
        for kind in dict.fromkeys(self.layer_types):
            allowed = seen[kind][None, None]
            if valid is not None:
                allowed = allowed & valid[:, None, None, :]
            masks[kind] = torch.where(allowed, zero, lowest)
        return masks[self.layer_types[0]] if self.uniform else masks
