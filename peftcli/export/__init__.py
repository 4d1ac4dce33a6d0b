"""`peft export`: a run as a GGUF file for llama.cpp, Ollama and LM Studio, checked by llama.cpp itself.

- `run.py`: the command: merged model or `--adapter-only`, a temp file renamed only after the check.
- `arch.py`: which architectures export and llama.cpp's hyperparameter keys for each.
- `tokenizer.py`: the vocabulary, merges, token types, special ids and chat template as llama.cpp reads them.
- `quant.py`: the tensor types (f32, f16, bf16, q8_0, q4_0, q4_1) and which tensor gets which.
- `gguf.py`: the merged model's file; `adapter.py`: a LoRA adapter file for llama.cpp's ``--lora``.
- `ollama.py`: a Modelfile beside the GGUF.
- `verify.py`: load the file with llama.cpp (the ``xllamacpp`` binding) and compare greedy continuations
  with peftcli's own.
"""
