"""Speed: timing an artifact, `kiln bench` (interleaved rounds in worker processes) and `kiln tune` (candidates,
ranking, reports, timing on the deployment machine)."""
