"""Placeholder: being written."""

PEFT_TYPE = "LORA"
MERGEABLE = False
