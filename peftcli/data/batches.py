"""Tokenized examples stored back to back, and padded batches of them.

Labels follow transformers: the model shifts them itself, and -100 marks a token that is not a target.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from peftcli.data.rows import IGNORE_INDEX


@dataclass(eq=False)
class TokenizedDataset(torch.utils.data.Dataset):
    """Rows of token ids stored back to back; `dataset[i]` is example i, ready for `collate`.

    An example is one row, or `rows_per_example` rows stored together: a preference pair (chosen, rejected),
    or a KTO example (its answer, and the same prompt with another example's answer, which estimates the KL
    term). Those rows' reference log-probabilities, once computed, ride along in `reference_logps`.
    """

    input_ids: Tensor  # (total_tokens,) int32
    loss_mask: Tensor  # (total_tokens,) bool: True on target tokens
    offsets: Tensor  # (rows + 1,) int64: row i is input_ids[offsets[i] : offsets[i + 1]]
    class_labels: Tensor | None  # (rows,) int64 class ids for classification, else None
    num_examples: int  # examples kept (before packing)
    num_truncated: int  # examples cut to max_length
    num_dropped: int  # rows with nothing to learn: empty, or every target cut off
    rows_per_example: int = 1
    desirable: Tensor | None = None  # KTO: (examples,) bool, the label
    reference_logps: Tensor | None = (
        None  # (rows,) float32: the reference policy's log-prob of each row's targets
    )

    def __len__(self) -> int:
        return (len(self.offsets) - 1) // self.rows_per_example

    def row(self, index: int) -> dict[str, list[int] | int]:
        start, end = self.offsets[index].item(), self.offsets[index + 1].item()
        ids = self.input_ids[start:end].long()
        if self.class_labels is not None:
            labels = self.class_labels[index].item()
        else:
            labels = torch.where(self.loss_mask[start:end], ids, IGNORE_INDEX).tolist()
        return {"input_ids": ids.tolist(), "attention_mask": [1] * (end - start), "labels": labels}

    def __getitem__(self, index: int) -> dict:
        """A row's {input_ids, attention_mask, labels}, or for several rows {rows: [...]} with the example's
        reference_logps and desirable where known."""
        if self.rows_per_example == 1:
            return self.row(index)
        first = index * self.rows_per_example
        item: dict = {"rows": [self.row(first + k) for k in range(self.rows_per_example)]}
        if self.reference_logps is not None:
            item["reference_logps"] = self.reference_logps[first : first + self.rows_per_example].tolist()
        if self.desirable is not None:
            item["desirable"] = bool(self.desirable[index])
        return item

    @property
    def num_rows(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> list[int]:
        return (self.offsets[1:] - self.offsets[:-1]).tolist()


def collate(batch: list[dict], pad_id: int) -> dict[str, Tensor]:
    """Right-pad a batch to its longest row -> input_ids, attention_mask, labels as (batch, seq) LongTensors.

    Padding gets pad_id, attention 0 and label -100. Classification rows carry one class id each, so
    their `labels` is a (batch,) LongTensor. Preference pairs become one batch of 2 x batch rows, every chosen
    row first, then every rejected one, with `reference_logps` (2 x batch,) where known. KTO examples keep
    their answers in input_ids..., the KL rows apart in kl_input_ids..., and `desirable` (batch,) bool.
    """
    if "rows" not in batch[0]:
        return _pad(batch, pad_id)
    width = len(batch[0]["rows"])
    known = "reference_logps" in batch[0]
    if "desirable" not in batch[0]:
        out = _pad([item["rows"][k] for k in range(width) for item in batch], pad_id)
        if known:
            out["reference_logps"] = torch.tensor(
                [item["reference_logps"][k] for k in range(width) for item in batch]
            )
        return out
    out = _pad([item["rows"][0] for item in batch], pad_id)
    out |= {f"kl_{key}": value for key, value in _pad([item["rows"][1] for item in batch], pad_id).items()}
    out["desirable"] = torch.tensor([item["desirable"] for item in batch])
    if known:
        out["reference_logps"] = torch.tensor([item["reference_logps"][0] for item in batch])
        out["kl_reference_logps"] = torch.tensor([item["reference_logps"][1] for item in batch])
    return out


def _pad(batch: list[dict], pad_id: int) -> dict[str, Tensor]:
    longest = max(len(example["input_ids"]) for example in batch)
    input_ids = torch.full((len(batch), longest), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), longest), dtype=torch.long)
    classification = not isinstance(batch[0]["labels"], list)
    if classification:
        labels = torch.tensor([example["labels"] for example in batch], dtype=torch.long)
    else:
        labels = torch.full((len(batch), longest), IGNORE_INDEX, dtype=torch.long)
    for row, example in enumerate(batch):
        length = len(example["input_ids"])
        input_ids[row, :length] = torch.as_tensor(example["input_ids"])
        attention_mask[row, :length] = torch.as_tensor(example["attention_mask"])
        if not classification:
            labels[row, :length] = torch.as_tensor(example["labels"])
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
