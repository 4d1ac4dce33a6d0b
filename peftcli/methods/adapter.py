"""Placeholder: being written."""

PEFT_TYPE = "BOTTLENECK_ADAPTER"
MERGEABLE = False
