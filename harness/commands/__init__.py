"""One module per CLI verb; harness/cli.py registers each module's `main` (with its `CONTEXT` settings)."""
