"""The merge's self-check: load the written dir with plain transformers and compare its logits with base +
adapter's on a fixed probe batch, both computed in float32.

The tolerance is relative to the logit scale, ``max(1, max |reference logit|)``: 1e-4 of it for float32
output, 5e-2 for bfloat16 / float16.

- float32: the folded weights differ from the unfolded computation only by rounding, which grows with
  depth and logit size: ~4e-7 on the tiny test models; 5.9e-5 (q/v adapter) and 1.2e-4 (all-linear,
  rank 16) on SmolLM2-135M, whose logits reach ~30. A fixed 1e-4 would fail correct merges of real models;
  1e-4 of the scale (3e-3 there) still fails a delta that is missing, transposed or mis-scaled.
- bfloat16 / float16: rounding every weight to 8 (bf16) or 11 (fp16) significant bits moves logits by a
  fraction of a percent of their scale per layer (~1% on the tiny models); 5% leaves room for depth. In
  half precision the check catches structural faults (a tensor missing, transposed or misplaced), not a
  delta that is a little off: the float32 path pins that.
"""

from __future__ import annotations

import gc
from pathlib import Path

import torch
from torch import Tensor, nn

from peftcli.errors import CheckFailed
from peftcli.models.load import auto_class

# The tolerances, times max(1, max |reference logit|) (module docstring).
TOLERANCES = {torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 5e-2}
PROBE_SHAPE = (2, 16)  # (sequences, tokens) of the check's fixed random token ids


def probe_batch(config) -> dict[str, Tensor]:
    """Fixed pseudo-random token ids (no padding) for the check: the same for every run of a model."""
    text = config.get_text_config()
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, text.vocab_size, PROBE_SHAPE, generator=generator)
    pad = getattr(text, "pad_token_id", None)
    if isinstance(pad, int):
        ids[ids == pad] = (pad + 1) % text.vocab_size  # a pad id would change where a classifier pools
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@torch.no_grad()
def logits_of(model: nn.Module, probe: dict[str, Tensor]) -> Tensor:
    return model(**probe).logits.float()


def check_merged(
    directory: Path, task: str, probe: dict, reference: Tensor, out_dtype: torch.dtype
) -> tuple[float, float]:
    """Load the written dir with plain transformers; (max |logit difference|, tolerance) or CheckFailed."""
    try:
        model, info = auto_class(task).from_pretrained(
            str(directory), dtype=torch.float32, output_loading_info=True, trust_remote_code=False
        )
    except (OSError, ValueError, RuntimeError) as e:
        raise CheckFailed(f"the merged model does not load with transformers: {e}") from e
    bad = sorted(info.get("missing_keys", ())) + sorted(info.get("mismatched_keys", ()))
    if bad:
        raise CheckFailed(f"the merged model loads with tensors missing or misshaped (e.g. {bad[0]})")
    merged = logits_of(model.eval(), probe)
    del model
    gc.collect()
    diff = float((merged - reference).abs().max())
    tolerance = TOLERANCES[out_dtype] * max(1.0, float(reference.abs().max()))
    if not diff <= tolerance:  # `not <=`: a NaN fails too
        raise CheckFailed(
            f"the merged model's logits differ from base + adapter by {diff:.3g} "
            f"(tolerance {tolerance:.1e}): nothing written"
        )
    return diff, tolerance
