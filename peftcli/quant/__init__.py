"""Frozen linear layers whose weights stay quantized: each product dequantizes them only while it runs.

- formats.py: the formats and what each costs per weight, in plain numbers (no torch: `peft count` reads it).
- product.py: the layer protocol every format shares (``QuantLinear``) and the product ``x W^T`` whose
  backward gives the input its gradient without keeping a dense weight.
- blocks.py: int8 and int4 codes in blocks of 32 along the input (GGUF Q8_0's and Q4_1's layouts).
- nf4.py: bitsandbytes' NF4 (QLoRA), through bitsandbytes' own quantize and dequantize.
- ggml.py: GGUF tensor bytes packed straight into blocks.py's layers, exactly.
- convert.py: quantizing a model's linear layers, and dequantizing them back (merge).

Methods wrap these layers like any frozen linear (methods/modules.py asks `is_quantized`); nothing here
knows a method.
"""
