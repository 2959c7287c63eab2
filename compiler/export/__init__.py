"""The export flow and its steps: target selection, options, routes, the pass stage, building an artifact, the
manifest, staging and publishing, and loading an export back (`loading`)."""
