"""The OpenAI-compatible HTTP server (retrieval-attn serve); needs the serve extra."""
