"""Per-user text for edge agents: loading a corpus, splitting it, tokenizing and packing it.

Corpus formats understood by :func:`load_users` (generic, so any corpus plugs in):

* a directory of ``<user>.txt`` files (user id = file stem);
* a ``.jsonl`` file of ``{"user_id": ..., "text": ...}`` objects (several lines of one user are
  concatenated with ``"\\n"``);
* a speaker-tagged play (like tinyshakespeare): a ``.txt`` file of turns separated by blank lines, each
  turn a ``NAME:`` line followed by the speech. One user per speaker (``KING RICHARD III`` becomes
  ``king-richard-iii``); a user's text is their turns joined by blank lines;
* any other ``.txt`` file: one user named by the file stem.

Packing (:func:`pack_sequences`) follows the usual causal-LM recipe: concatenate, cut into full
``seq_len`` blocks and **drop the tail** (no padding, so no attention or label masks are needed). A text
shorter than one block becomes one shorter block, so every user with at least two tokens has a sample.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from schemas.errors import ConfigError

USER_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}$")
SPEAKER_RE = re.compile(r"^[A-Z][A-Za-z .']*:$")
_PARAGRAPH_SPLIT_RE = re.compile(r"\n[ \t]*\n+")

SplitMode = Literal["random", "tail"]
SPLIT_MODES: tuple[SplitMode, ...] = ("random", "tail")


@dataclass(frozen=True)
class UserData:
    """One user's local data: the training part and the held-out part of their text."""

    user_id: str
    train_text: str
    heldout_text: str

    @classmethod
    def from_text(
        cls, user_id: str, text: str, *, heldout_fraction: float = 0.1, mode: SplitMode = "random"
    ) -> UserData:
        train, heldout = split_user_text(text, heldout_fraction=heldout_fraction, seed=user_id, mode=mode)
        return cls(user_id=user_id, train_text=train, heldout_text=heldout)

    def num_samples(self, seq_len: int, tokenizer: Any | None = None) -> int:
        """Number of packed training sequences of ``seq_len`` tokens (``tokenizer`` defaults to bytes)."""
        if tokenizer is None:
            from modeling.base import ByteTokenizer

            tokenizer = ByteTokenizer()
        return int(pack_sequences(tokenize(tokenizer, self.train_text), seq_len).shape[0])


def normalize_user_id(name: str) -> str:
    """A speaker or file name as a user id: lower case, runs of other characters as ``-``."""
    slug = re.sub(r"[^a-z0-9]+", "-", name.strip().lower()).strip("-")
    return slug[:128].rstrip("-")


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from exc


def _load_directory(path: Path) -> dict[str, str]:
    users: dict[str, str] = {}
    for file in sorted(path.glob("*.txt")):
        if not file.is_file():
            continue
        user = file.stem if USER_ID_RE.match(file.stem) else normalize_user_id(file.stem)
        if not user or not USER_ID_RE.match(user):
            raise ConfigError(f"{file}: file name does not give a valid user id")
        if user in users:
            raise ConfigError(f"{file}: user id {user!r} is given by two files")
        users[user] = _read_text(file)
    return users


def _load_jsonl(path: Path) -> dict[str, str]:
    parts: dict[str, list[str]] = {}
    for lineno, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}:{lineno}: not a JSON object ({exc.msg})") from exc
        if not isinstance(record, dict):
            raise ConfigError(f"{path}:{lineno}: expected a JSON object with user_id and text")
        user, text = record.get("user_id"), record.get("text")
        if not isinstance(user, str) or not USER_ID_RE.match(user):
            raise ConfigError(f"{path}:{lineno}: user_id must be a string matching {USER_ID_RE.pattern}")
        if not isinstance(text, str):
            raise ConfigError(f"{path}:{lineno}: text must be a string")
        parts.setdefault(user, []).append(text)
    return {user: "\n".join(texts) for user, texts in parts.items()}


def _paragraphs(text: str) -> list[str]:
    return [p.strip("\n") for p in _PARAGRAPH_SPLIT_RE.split(text) if p.strip()]


def _is_speaker_tagged(blocks: list[str]) -> bool:
    tagged = sum(1 for block in blocks if SPEAKER_RE.match(block.split("\n", 1)[0].strip()))
    return tagged >= 2 and tagged * 2 >= len(blocks)


def _split_speakers(blocks: list[str]) -> dict[str, str]:
    turns: dict[str, list[str]] = {}
    speaker: str | None = None
    for block in blocks:
        first, _, rest = block.partition("\n")
        if SPEAKER_RE.match(first.strip()):
            speaker = normalize_user_id(first.strip()[:-1]) or None
            speech = rest.strip("\n")
        else:  # a block without a tag continues the previous speaker's turn
            speech = block
        if speaker is not None and speech.strip():
            turns.setdefault(speaker, []).append(speech)
    return {user: "\n\n".join(parts) for user, parts in turns.items()}


def load_users(path: Path, *, min_chars: int = 0, max_users: int | None = None) -> dict[str, str]:
    """Users' texts from ``path`` (see the module doc for formats), sorted by user id.

    Users with fewer than ``min_chars`` characters are dropped; ``max_users`` keeps those with the most
    text (ties broken by user id). Raises :class:`ConfigError` on a missing path, a bad JSONL line or
    when no user is left.
    """
    path = Path(path)
    if max_users is not None and max_users < 1:
        raise ConfigError(f"max_users must be >= 1, got {max_users}")
    if not path.exists():
        raise ConfigError(f"user data path {path} does not exist")
    if path.is_dir():
        users = _load_directory(path)
    elif path.suffix == ".jsonl":
        users = _load_jsonl(path)
    else:
        text = _read_text(path)
        blocks = _paragraphs(text)
        if _is_speaker_tagged(blocks):
            users = _split_speakers(blocks)
        else:
            user = normalize_user_id(path.stem)
            if not USER_ID_RE.match(user):
                raise ConfigError(f"{path}: file name does not give a valid user id")
            users = {user: text} if text.strip() else {}
    users = {u: t for u, t in users.items() if t.strip() and len(t) >= min_chars}
    if max_users is not None:
        ranked = sorted(users, key=lambda u: (-len(users[u]), u))[:max_users]
        users = {u: users[u] for u in ranked}
    if not users:
        raise ConfigError(f"no users with at least {min_chars} characters in {path}")
    return dict(sorted(users.items()))


def _seed_int(seed: str) -> int:
    return int.from_bytes(hashlib.sha256(seed.encode("utf-8")).digest()[:8], "big")


def split_user_text(
    text: str, *, heldout_fraction: float = 0.1, seed: str, mode: SplitMode = "random"
) -> tuple[str, str]:
    """Deterministic ``(train, heldout)`` split of one user's text.

    Paragraphs (blank-line separated turns) are the unit: ``round(fraction * n)`` of them, at least one
    and at most ``n - 1``, go to the held-out part; both parts keep the original order. ``mode``:

    * ``"random"``: the held-out paragraphs are chosen by an RNG seeded with ``seed`` (the user id);
    * ``"tail"`` (time-like): the **last** paragraphs are held out, so the held-out text comes after
      all of the training text, as a user's next messages come after their history.

    With fewer than two paragraphs the last ``fraction`` of the characters (moved to a whitespace
    boundary when there is one) is held out, in both modes. ``heldout_fraction=0`` holds out nothing.
    """
    if not 0.0 <= heldout_fraction < 1.0:
        raise ConfigError(f"heldout_fraction must be in [0, 1), got {heldout_fraction}")
    if mode not in SPLIT_MODES:
        raise ConfigError(f"split mode must be one of {list(SPLIT_MODES)}, got {mode!r}")
    if heldout_fraction == 0.0:
        return text, ""
    paragraphs = _paragraphs(text)
    if len(paragraphs) >= 2:
        n = len(paragraphs)
        k = min(max(round(heldout_fraction * n), 1), n - 1)
        if mode == "tail":
            held = set(range(n - k, n))
        else:
            held = set(random.Random(_seed_int(seed)).sample(range(n), k))
        train = "\n\n".join(p for i, p in enumerate(paragraphs) if i not in held)
        heldout = "\n\n".join(p for i, p in enumerate(paragraphs) if i in held)
        return train, heldout
    body = text.strip()
    if len(body) < 2:
        return body, ""
    cut = min(max(int(len(body) * (1.0 - heldout_fraction)), 1), len(body) - 1)
    space = body.rfind(" ", 1, cut + 1)
    if space > 0 and body[:space].strip() and body[space:].strip():
        cut = space
    return body[:cut].rstrip(), body[cut:].lstrip()


def tokenize(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` with the tokenizer's default special tokens (BOS for both the
    :class:`~modeling.base.ByteTokenizer` and typical Hugging Face tokenizers)."""
    ids = tokenizer.encode(text)
    if isinstance(ids, torch.Tensor):
        ids = ids.flatten().tolist()
    return [int(i) for i in ids]


def pack_sequences(token_ids: list[int], seq_len: int) -> torch.Tensor:
    """Causal-LM packing: ``[n, seq_len]`` int64 blocks of consecutive tokens, the tail dropped.

    Fewer than ``seq_len`` (but at least 2) tokens give one block of all of them (``[1, len]``); fewer
    than 2 tokens give an empty ``[0, seq_len]`` tensor. No padding is ever added.
    """
    if seq_len < 2:
        raise ConfigError(f"seq_len must be >= 2, got {seq_len}")
    ids = torch.tensor(token_ids, dtype=torch.long)
    if ids.numel() < 2:
        return torch.empty((0, seq_len), dtype=torch.long)
    if ids.numel() < seq_len:
        return ids.unsqueeze(0)
    n = ids.numel() // seq_len
    return ids[: n * seq_len].view(n, seq_len).clone()
