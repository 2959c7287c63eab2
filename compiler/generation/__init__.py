"""Text generation: a causal LM exported with its KV cache (growing or static), the attention masks each layer
takes, the decoding loop, and the gate against the user's own model."""
