"""The export stage: merge an adapter into its base, verify the merge, serving-ready files, model card and
Hub push, and folders written whole or not at all."""
