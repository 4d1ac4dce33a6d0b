"""Placeholder: being written."""

PEFT_TYPE = "PREFIX_TUNING"
MERGEABLE = False
