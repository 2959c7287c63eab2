"""The export flow and its steps: target selection, options, the stages (`stages`: captured -> optimized -> built ->
validated, which the one-call flow `pipeline` composes), routes, the pass stage, building an artifact, the
manifest, staging and publishing, and loading an export back (`loading`)."""
