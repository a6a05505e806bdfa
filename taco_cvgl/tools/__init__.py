"""Command-line tools: each module has a typed function that does the work and a short `main`."""
