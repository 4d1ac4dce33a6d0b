"""The PEFT methods, one module each, and the one registry that names them.

Every method module offers the same plain functions:

- ``PEFT_TYPE: str`` — the ``peft_type`` written to adapter_config.json (HF PEFT's name where it has one).
- ``inject(model, method, task) -> nn.Module`` — freeze the base model, add the method's trainable parts
  (and ``modules_to_save``), return the model to train: ``model`` itself, or a wrapper whose ``forward``
  and ``generate`` take the same arguments as the base model's and which keeps it as ``.base_model``.
  New parameters are created on the base weights' device and dtype, so it also works on the meta device.
- ``adapter_state(model) -> dict[str, Tensor]`` — the trainable state under HF PEFT's keys.
- ``load_adapter_state(model, state)`` — the inverse; missing or unexpected keys raise ``AdapterError``.
- ``adapter_config(model, method, task) -> dict`` — the method's fields of adapter_config.json.
- ``method_from_config(config) -> MethodSection`` — the inverse, for adapters written here or by HF PEFT;
  a field that changes the math and is not supported raises ``UserError`` naming it.
- ``merge(model) -> nn.Module`` — only where the method folds into the weights (``MERGEABLE = True``).
"""

from types import ModuleType

from peftcli.methods import adapter, bitfit, lora, prefix, prompt

METHODS: dict[str, ModuleType] = {
    "lora": lora,
    "prefix-tuning": prefix,
    "prompt-tuning": prompt,
    "adapter": adapter,
    "bitfit": bitfit,
}

BY_PEFT_TYPE: dict[str, ModuleType] = {m.PEFT_TYPE: m for m in METHODS.values()}

TASK_TYPES = {"causal-lm": "CAUSAL_LM", "sequence-classification": "SEQ_CLS"}
