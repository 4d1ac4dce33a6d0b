"""Placeholder: being written."""

PEFT_TYPE = "PROMPT_TUNING"
MERGEABLE = False
