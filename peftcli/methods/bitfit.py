"""Placeholder: being written."""

PEFT_TYPE = "BITFIT"
MERGEABLE = False
