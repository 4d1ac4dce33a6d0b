"""Trying a run: `peft generate`, `peft chat` and `peft predict`.

- `load.py`: the run (or a bare adapter dir) loaded once for inference, the adapter folded in where it can.
- `llama.py`: a Llama decoder in plain torch, what generate and chat run on a llama base (no transformers
  modeling code to import before the first token).
- `prompt.py`: how a prompt or a conversation is rendered (as the training data was) and where an answer ends.
- `generate.py`: one completion (streamed) or one prediction.
- `chat.py`: an interactive conversation with history.
"""

from peftcli.infer.generate import classify, complete, continue_ids, run_generate, run_predict
from peftcli.infer.load import InferenceInfo, load_for_inference
from peftcli.infer.prompt import CHAT_FORMATS, encode_prompt, prompt_style

__all__ = [
    "CHAT_FORMATS",
    "InferenceInfo",
    "classify",
    "complete",
    "continue_ids",
    "encode_prompt",
    "load_for_inference",
    "prompt_style",
    "run_generate",
    "run_predict",
]
