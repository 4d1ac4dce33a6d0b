"""Base models: where a name points (sources.py), their shapes without torch (shapes.py, gguf_header.py),
and loading them (load.py)."""
