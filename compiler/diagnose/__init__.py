"""Where an artifact diverges from the model: module boundaries and prefix programs (`cut`), the bisection and the
one-build fast path, the divergence record, `kiln debug` and its HTML profile."""
