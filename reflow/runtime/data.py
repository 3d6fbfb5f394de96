"""The data a worker reads: every worker loads the experiment's datasets itself (the controller sends only
indices), each on first use.

    train_prompts  RL prompts (data.train)          eval_prompts  data.eval, first data.eval_size
    ptx            PPO-ptx SFT rows (data.ptx)       sft           SFT rows (data.train)
    rehearsal      selective rehearsal's (prompt, response) rows (rehearsal.data)
    pairs          preference pairs for training     eval_pairs    the held-out share (eval_fraction), split
                                                                   the same way on every worker by the seed
"""

from __future__ import annotations

from functools import cached_property

import torch

from reflow.data.datasets import load_preferences, load_prompts, load_sft


class WorkerData:
    def __init__(self, cfg, tokenizer):
        self.cfg, self.tokenizer = cfg, tokenizer
        self.skipped = 0  # bad rows skipped (data.on_bad_row=skip), over the datasets loaded so far

    def _load(self, loader, path: str, **limits) -> list:
        """Rows of one file by `loader`, counting the bad rows it skipped."""
        rows, skipped = loader(path, self.tokenizer, on_bad_row=self.cfg.data.on_bad_row, **limits)
        self.skipped += skipped
        return rows

    def _prompts(self, path: str) -> list:
        return self._load(load_prompts, path, max_prompt_len=self.cfg.data.max_prompt_len)

    @cached_property
    def train_prompts(self) -> list:
        return self._prompts(self.cfg.data.train)

    @cached_property
    def eval_prompts(self) -> list:
        d = self.cfg.data
        if not d.eval:
            return []
        rows = self._prompts(d.eval)
        return rows[: d.eval_size] if d.eval_size else rows

    def _sft(self, path: str) -> list:
        return self._load(load_sft, path, max_len=self.cfg.data.max_len)

    @cached_property
    def ptx(self) -> list:
        use = self.cfg.data.ptx and self.cfg.algo.ptx_coef > 0
        return self._sft(self.cfg.data.ptx) if use else []

    @cached_property
    def rehearsal(self) -> list:
        r = getattr(self.cfg, "rehearsal", None)
        return self._sft(r.data) if r is not None and r.enabled else []

    @cached_property
    def sft(self) -> list:
        return self._sft(self.cfg.data.train)

    @cached_property
    def _pairs_split(self) -> tuple[list, list]:
        pairs = self._load(load_preferences, self.cfg.data.train, max_len=self.cfg.data.max_len)
        g = torch.Generator().manual_seed(self.cfg.seed)
        order = torch.randperm(len(pairs), generator=g).tolist()
        n_eval = int(len(pairs) * self.cfg.eval_fraction)
        return [pairs[i] for i in order[n_eval:]], [pairs[i] for i in order[:n_eval]]

    @property
    def pairs(self) -> list:
        return self._pairs_split[0]

    @property
    def eval_pairs(self) -> list:
        return self._pairs_split[1]
