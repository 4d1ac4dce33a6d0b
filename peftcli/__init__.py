"""peftcli: parameter-efficient fine-tuning from one YAML recipe."""

__version__ = "0.1.0"
