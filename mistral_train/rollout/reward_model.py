"""A reward model trained by this project (the tiny_reward recipe's final/: a sequence-classification folder
with one label) as a reward function. It scores prompt + completion encoded whole by the chat template, as
data/preference.py encodes a pair for training (one BOS, the answer closed by EOS), pooling the last non-pad
token as Mistral's sequence-classification head does, with the folder's own tokenizer and chat format (the
policy's tokenizer and its default format when the folder has no tokenizer files).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mistral_train.errors import ConfigError
from mistral_train.folders import check_model_folder, folder_task
from mistral_train.model import Mistral
from mistral_train.rollout.reward_builtins import completion_text
from mistral_train.tokenizer.files import folder_chat_format
from mistral_train.tokenizer.tokenizer import Tokenizer, load_tokenizer

class RewardModel:
    """A sequence-classification folder as a reward function: the score of prompt + completion."""

    def __init__(self, folder: str, tokenizer: Tokenizer, where: str, device: torch.device, batch_size: int = 16):
        check_model_folder(folder, where)
        task = folder_task(Path(folder))
        if task != "sequence_classification":
            raise ConfigError(f"{where}={folder} holds a {task} model; a reward model is a sequence-classification "
                              "folder with one label (e.g. the tiny_reward recipe's final/)")
        self.model = Mistral.from_pretrained(folder, task=task).to(device).eval().requires_grad_(False)
        if self.model.config.num_labels != 1:
            raise ConfigError(f"{where}={folder} has {self.model.config.num_labels} labels; a reward model has one")
        own = any((Path(folder) / f).is_file() for f in ("tekken.json", "tokenizer.model", "tokenizer.json"))
        self.tokenizer = load_tokenizer(folder) if own else tokenizer  # else: the policy's
        self.chat_format = folder_chat_format(folder) if own else None
        self.device, self.batch_size = device, batch_size

    def encode(self, prompt: Any, completion: Any) -> list[int]:
        """prompt + completion encoded whole by the chat template (one BOS, the answer closed by EOS)."""
        turns = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        answer = {"role": "assistant", "content": completion_text(completion)}
        return self.tokenizer.encode_chat(turns + [answer], self.chat_format)[0]

    @torch.no_grad()
    def __call__(self, prompts: list, completions: list, **_: Any) -> list[float]:
        sequences = [self.encode(p, c) for p, c in zip(prompts, completions)]
        pad = self.model.config.pad_token_id
        step = self.batch_size if pad is not None else 1  # without a pad id the head pools one row at a time
        scores: list[float] = []
        for start in range(0, len(sequences), step):
            chunk = sequences[start : start + step]
            width = max(len(s) for s in chunk)
            ids = torch.tensor([s + [pad or 0] * (width - len(s)) for s in chunk], device=self.device)
            mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in chunk], device=self.device)
            scores += self.model(ids, attention_mask=mask)[:, 0].float().tolist()
        return scores


