"""The parity gate: the reference (the user's own model), the parity input sets and the judgement of every output
(`gate`), user input files, and re-verifying an export (`verify`)."""
