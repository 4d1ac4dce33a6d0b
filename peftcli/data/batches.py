"""Tokenized examples stored back to back, and padded batches of them.

Labels follow transformers: the model shifts them itself, and -100 marks a token that is not a target.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

IGNORE_INDEX = -100  # transformers' cross-entropy ignore_index: not a target


@dataclass(eq=False)
class TokenizedDataset(torch.utils.data.Dataset):
    """Rows of token ids stored back to back; `dataset[i]` is a dict of lists ready for `collate`."""

    input_ids: Tensor  # (total_tokens,) int32
    loss_mask: Tensor  # (total_tokens,) bool: True on target tokens
    offsets: Tensor  # (rows + 1,) int64: row i is input_ids[offsets[i] : offsets[i + 1]]
    class_labels: Tensor | None  # (rows,) int64 class ids for classification, else None
    num_examples: int  # examples kept (before packing)
    num_truncated: int  # examples cut to max_length
    num_dropped: int  # rows with nothing to learn: empty, or every target cut off

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, index: int) -> dict[str, list[int] | int]:
        start, end = self.offsets[index].item(), self.offsets[index + 1].item()
        ids = self.input_ids[start:end].long()
        if self.class_labels is not None:
            labels = self.class_labels[index].item()
        else:
            labels = torch.where(self.loss_mask[start:end], ids, IGNORE_INDEX).tolist()
        return {"input_ids": ids.tolist(), "attention_mask": [1] * (end - start), "labels": labels}

    @property
    def lengths(self) -> list[int]:
        return (self.offsets[1:] - self.offsets[:-1]).tolist()


def collate(batch: list[dict], pad_id: int) -> dict[str, Tensor]:
    """Right-pad a batch to its longest row -> input_ids, attention_mask, labels as (batch, seq) LongTensors.

    Padding gets pad_id, attention 0 and label -100. Classification rows carry one class id each, so
    their `labels` is a (batch,) LongTensor.
    """
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
