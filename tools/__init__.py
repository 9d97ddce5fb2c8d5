"""Command-line tools: thin layers over the public API."""
