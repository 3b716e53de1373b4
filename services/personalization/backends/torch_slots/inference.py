"""Scoring and generation on a :class:`~.stacks.SlotStack`, for a batch of rows that may belong to
different users (model thread only).

Rows carry their own personal adapter (or none); :meth:`SlotStack.serving` binds them to slots and
routes each row to its slot, and one forward serves them all. A batch whose rows have no personal
adapter does no LoRA work at all (the global adapter is merged).

Generation uses the model's ``generate`` (every decoding step keeps the batch's routing) with
left padding, greedy decoding driven by :class:`RowSampler`, which picks every row's next token itself
(per-row temperature, top-p and seeded generator, so a request's output does not depend on the batch it
landed in, up to float rounding) and :class:`RowBudget`, which stops each row at its own
``max_new_tokens``; EOS stops a row as usual. A row with ``on_token`` (streaming) gets each token from
:class:`RowSampler` the moment it is chosen, and :class:`RowStopped` ends it when that returns False.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from services.personalization.backends.base import GenOut, GenRow, ScoreOut, ScoreRow

if TYPE_CHECKING:
    from services.personalization.backends.torch_slots.stacks import SlotStack

log = logging.getLogger("pfi.serve.inference")


def score_rows(stack: SlotStack, rows: Sequence[ScoreRow]) -> list[ScoreOut]:
    """Per row: summed next-token NLL, correct argmax predictions and predicted positions."""
    length = max(len(r.ids) for r in rows)
    ids = torch.full((len(rows), length), stack.tokens.pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row.ids)] = torch.tensor(row.ids, dtype=torch.long)
        mask[i, : len(row.ids)] = 1
    with torch.inference_mode(), stack.serving([r.adapter for r in rows]):
        logits = stack.model(input_ids=ids, attention_mask=mask).logits
        # One contiguous [rows * positions, vocab] matrix: cross-entropy and argmax along its last
        # dimension are cheaper than on the strided [rows, vocab, positions] view.
        flat = logits[:, :-1].float().reshape(-1, logits.shape[-1])
        target = ids[:, 1:]
        valid = mask[:, 1:].bool()
        for i, row in enumerate(rows):  # retrieved context conditions the text but is not scored
            valid[i, : row.context_len] = False
        nll = F.cross_entropy(flat, target.reshape(-1), reduction="none").view_as(target)
        nll = torch.where(valid, nll, torch.zeros_like(nll)).sum(dim=1)
        correct = ((flat.argmax(-1).view_as(target) == target) & valid).sum(dim=1)
        count = valid.sum(dim=1)
    return [
        ScoreOut(nll_sum=float(nll[i]), correct=int(correct[i]), tokens=int(count[i]))
        for i in range(len(rows))
    ]


class RowSampler:
    """A logits processor that chooses each row's next token (argmax at temperature 0, else top-p
    sampling from the row's own generator) and leaves only that token finite: with greedy decoding
    ``generate`` then takes exactly this choice. A row with ``on_token`` gets each chosen token (until
    EOS or its budget) as soon as it is chosen; when that returns False the row is ``stopped``."""

    def __init__(self, rows: Sequence[GenRow], eos_id: int | None = None) -> None:
        self.rows = rows
        self.eos_id = eos_id
        self.emitted = [0] * len(rows)  # tokens handed to a row's on_token
        self.ended = [False] * len(rows)  # a streamed row that has ended (EOS, budget or its on_token)
        self.stopped = torch.zeros(len(rows), dtype=torch.bool)  # ended by its on_token
        self.generators = [
            None
            if row.temperature <= 0
            else torch.Generator().manual_seed(row.seed if row.seed is not None else secrets.randbits(63))
            for row in rows
        ]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        chosen = torch.empty(scores.shape[0], dtype=torch.long)
        for i, row in enumerate(self.rows):
            logits = scores[i].float()
            generator = self.generators[i]
            if generator is None:
                chosen[i] = int(logits.argmax())
                continue
            probs = torch.softmax(logits / row.temperature, dim=-1)
            if row.top_p < 1.0:
                ordered, order = probs.sort(descending=True)
                keep = ordered.cumsum(0) - ordered < row.top_p  # the smallest prefix reaching top_p
                ordered = torch.where(keep, ordered, torch.zeros_like(ordered))
                probs = torch.zeros_like(probs).scatter(0, order, ordered)
            chosen[i] = int(torch.multinomial(probs, 1, generator=generator))
        self._hand_out(chosen)
        out = torch.full_like(scores, float("-inf"))
        out.scatter_(1, chosen.unsqueeze(1).to(scores.device), 0.0)
        return out

    def _hand_out(self, chosen: torch.Tensor) -> None:
        for i, row in enumerate(self.rows):
            if row.on_token is None or self.ended[i]:
                continue
            token = int(chosen[i])
            if token == self.eos_id:
                self.ended[i] = True
                continue
            self.emitted[i] += 1
            try:
                keep = bool(row.on_token(token))
            except Exception:  # a consumer's bug ends its own row, never the batch
                log.exception("on_token failed; the row is stopped")
                keep = False
            if not keep:
                self.stopped[i] = True
            self.ended[i] = self.ended[i] or not keep or self.emitted[i] >= row.max_new_tokens


class RowStopped:
    """Stopping criterion: the rows whose ``on_token`` asked to stop (see :class:`RowSampler`)."""

    def __init__(self, sampler: RowSampler) -> None:
        self.sampler = sampler

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        return self.sampler.stopped.clone().to(input_ids.device)


class RowBudget:
    """Stopping criterion: row ``i`` is done after ``budgets[i]`` new tokens."""

    def __init__(self, prompt_length: int, budgets: Sequence[int]) -> None:
        self.prompt_length = prompt_length
        self.budgets = torch.tensor(list(budgets), dtype=torch.long)

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        generated = input_ids.shape[1] - self.prompt_length
        return (self.budgets <= generated).to(input_ids.device)


def generate_rows(stack: SlotStack, rows: Sequence[GenRow]) -> list[GenOut]:
    from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteriaList

    tokens = stack.tokens
    length = max(len(r.ids) for r in rows)
    ids = torch.full((len(rows), length), tokens.pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):  # left padding: every prompt ends at the same position
        ids[i, length - len(row.ids) :] = torch.tensor(row.ids, dtype=torch.long)
        mask[i, length - len(row.ids) :] = 1
    budget = max(r.max_new_tokens for r in rows)
    config = GenerationConfig(  # type: ignore[no-untyped-call]
        max_new_tokens=budget,
        do_sample=False,
        num_beams=1,
        pad_token_id=tokens.pad_id,
        eos_token_id=tokens.eos_id,
        bos_token_id=tokens.bos_id,
    )
    sampler = RowSampler(rows, tokens.eos_id)
    criteria = [RowBudget(length, [r.max_new_tokens for r in rows]), RowStopped(sampler)]
    with torch.inference_mode(), stack.serving([r.adapter for r in rows]):
        out = stack.model.generate(
            input_ids=ids,
            attention_mask=mask,
            generation_config=config,
            logits_processor=LogitsProcessorList([sampler]),
            stopping_criteria=StoppingCriteriaList(criteria),
        )
    results: list[GenOut] = []
    for i, row in enumerate(rows):
        new = [int(t) for t in out[i, length : length + row.max_new_tokens].tolist()]
        if bool(sampler.stopped[i]):
            results.append(GenOut(new[: sampler.emitted[i]], "stopped"))
        elif tokens.eos_id is not None and tokens.eos_id in new:
            results.append(GenOut(new[: new.index(tokens.eos_id)], "eos"))
        else:
            results.append(GenOut(new, "length"))
    return results
