"""Per-user corpora: loading (directory, JSONL, speaker-tagged plays), splitting, tokenizing, packing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from clients.data import (
    USER_ID_RE,
    UserData,
    load_users,
    normalize_user_id,
    pack_sequences,
    split_user_text,
    tokenize,
)
from modeling.base import ByteTokenizer
from schemas.errors import ConfigError

SHAKESPEARE = (
    Path(__file__).resolve().parents[2].parent / "shared" / "data" / "shakespeare" / "tinyshakespeare.txt"
)


def test_directory_of_text_files(tmp_path: Path) -> None:
    (tmp_path / "alice.txt").write_text("hello from alice\n\nsecond paragraph", encoding="utf-8")
    (tmp_path / "bob@example.org.txt").write_text("bob writes", encoding="utf-8")
    (tmp_path / "My Notes.txt").write_text("notes", encoding="utf-8")
    (tmp_path / "ignored.md").write_text("not a user", encoding="utf-8")
    users = load_users(tmp_path)
    assert users == {
        "alice": "hello from alice\n\nsecond paragraph",
        "bob@example.org": "bob writes",
        "my-notes": "notes",
    }
    assert list(users) == sorted(users)
    assert load_users(tmp_path, min_chars=6) == {"alice": users["alice"], "bob@example.org": "bob writes"}


def test_jsonl_concatenates_lines_of_a_user(tmp_path: Path) -> None:
    path = tmp_path / "corpus.jsonl"
    records = [
        {"user_id": "u1", "text": "first"},
        {"user_id": "u2", "text": "other"},
        {"user_id": "u1", "text": "second"},
    ]
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n\n", encoding="utf-8")
    assert load_users(path) == {"u1": "first\nsecond", "u2": "other"}


@pytest.mark.parametrize(
    ("line", "match"),
    [
        ("{not json", r"corpus.jsonl:2: not a JSON object"),
        ('["u", "t"]', r"corpus.jsonl:2: expected a JSON object"),
        ('{"user_id": "bad id!", "text": "x"}', r"corpus.jsonl:2: user_id"),
        ('{"user_id": "u2", "text": 3}', r"corpus.jsonl:2: text must be a string"),
    ],
)
def test_jsonl_errors_name_the_line(tmp_path: Path, line: str, match: str) -> None:
    path = tmp_path / "corpus.jsonl"
    path.write_text('{"user_id": "u1", "text": "ok"}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=match):
        load_users(path)


def test_missing_path_and_no_users(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_users(tmp_path / "nope")
    with pytest.raises(ConfigError, match="no users"):
        load_users(tmp_path)  # empty directory
    (tmp_path / "a.txt").write_text("short", encoding="utf-8")
    with pytest.raises(ConfigError, match="no users with at least 100"):
        load_users(tmp_path, min_chars=100)
    with pytest.raises(ConfigError, match="max_users"):
        load_users(tmp_path, max_users=0)


def test_speaker_tagged_play(tmp_path: Path) -> None:
    play = tmp_path / "play.txt"
    play.write_text(
        "KING RICHARD III:\nNow is the winter\nof our discontent.\n\n"
        "First Citizen:\nSpeak, speak.\n\n"
        "King Richard III:\nA horse!\n\n"
        "All:\nResolved.\n",
        encoding="utf-8",
    )
    users = load_users(play)
    assert users == {
        "all": "Resolved.",
        "first-citizen": "Speak, speak.",
        "king-richard-iii": "Now is the winter\nof our discontent.\n\nA horse!",
    }
    assert set(load_users(play, max_users=2)) == {"first-citizen", "king-richard-iii"}  # the most text


def test_plain_text_file_is_one_user(tmp_path: Path) -> None:
    path = tmp_path / "diary.txt"
    path.write_text("Dear diary: today.\n\nMore text.", encoding="utf-8")
    assert load_users(path) == {"diary": "Dear diary: today.\n\nMore text."}


def test_max_users_tie_break_by_name(tmp_path: Path) -> None:
    for name, text in {"c": "xx", "b": "xx", "a": "x", "d": "xxx"}.items():
        (tmp_path / f"{name}.txt").write_text(text, encoding="utf-8")
    assert list(load_users(tmp_path, max_users=2)) == ["b", "d"]
    assert list(load_users(tmp_path, max_users=3)) == ["b", "c", "d"]


def test_normalize_user_id() -> None:
    assert normalize_user_id("KING RICHARD III") == "king-richard-iii"
    assert normalize_user_id("LADY CAPULET'S MAN") == "lady-capulet-s-man"
    assert normalize_user_id("  First  Citizen ") == "first-citizen"


@pytest.mark.skipif(not SHAKESPEARE.exists(), reason="tinyshakespeare corpus not present")
def test_tinyshakespeare_split_by_speaker() -> None:
    users = load_users(SHAKESPEARE)
    assert len(users) > 250
    assert all(USER_ID_RE.match(u) for u in users)
    assert {"king-richard-iii", "first-citizen", "menenius", "romeo", "juliet"} <= set(users)
    big = load_users(SHAKESPEARE, min_chars=5001)
    assert len(big) >= 60
    top = load_users(SHAKESPEARE, max_users=10)
    assert len(top) == 10
    assert min(len(t) for t in top.values()) >= max(len(t) for u, t in users.items() if u not in top)
    assert not any(line.endswith(":") and line.isupper() for line in users["romeo"].splitlines())
    assert users["first-citizen"].startswith("Before we proceed any further, hear me speak.")


def test_split_is_deterministic_by_paragraph() -> None:
    paragraphs = [f"paragraph number {i}\nwith two lines" for i in range(30)]
    text = "\n\n".join(paragraphs)
    train, heldout = split_user_text(text, heldout_fraction=0.2, seed="alice")
    assert (train, heldout) == split_user_text(text, heldout_fraction=0.2, seed="alice")
    held = heldout.split("\n\n")
    kept = train.split("\n\n")
    assert len(held) == 6
    assert sorted(held + kept) == sorted(paragraphs)
    assert held == [p for p in paragraphs if p in held]  # original order kept
    assert split_user_text(text, heldout_fraction=0.2, seed="bob") != (train, heldout)


def test_split_keeps_both_parts_non_empty() -> None:
    train, heldout = split_user_text("one\n\ntwo", heldout_fraction=0.01, seed="u")
    assert train
    assert heldout
    train, heldout = split_user_text("one\n\ntwo", heldout_fraction=0.99, seed="u")
    assert train
    assert heldout
    train, heldout = split_user_text("a single paragraph of several words", heldout_fraction=0.3, seed="u")
    assert train == "a single paragraph of"
    assert heldout == "several words"
    assert split_user_text("ab", heldout_fraction=0.5, seed="u") == ("a", "b")
    assert split_user_text("x\n\ny", heldout_fraction=0.0, seed="u") == ("x\n\ny", "")
    with pytest.raises(ConfigError, match="heldout_fraction"):
        split_user_text("x", heldout_fraction=1.0, seed="u")


def test_pack_sequences_shapes() -> None:
    ids = list(range(25))
    packed = pack_sequences(ids, 8)
    assert packed.shape == (3, 8)
    assert packed.dtype == torch.long
    assert packed.flatten().tolist() == ids[:24]  # the tail is dropped
    assert pack_sequences(ids[:5], 8).tolist() == [[0, 1, 2, 3, 4]]  # shorter than a block: one row
    assert pack_sequences([7], 8).shape == (0, 8)
    assert pack_sequences([], 8).shape == (0, 8)
    with pytest.raises(ConfigError, match="seq_len"):
        pack_sequences(ids, 1)


class _HFLikeTokenizer:
    """Stands in for a Hugging Face tokenizer: ``encode`` adds BOS by default."""

    def encode(self, text: str) -> list[int]:
        return [1, *(len(word) + 10 for word in text.split())]


def test_tokenize_byte_and_hf_style() -> None:
    assert tokenize(ByteTokenizer(), "hé") == [256, 104, 195, 169]
    assert tokenize(_HFLikeTokenizer(), "ab c") == [1, 12, 11]


def test_user_data_num_samples() -> None:
    data = UserData.from_text("u1", "\n\n".join(["x" * 99] * 10), heldout_fraction=0.2)
    assert data.heldout_text == "\n\n".join(["x" * 99] * 2)
    tokens = 1 + 8 * 99 + 7 * 2  # bos + text + separators
    assert data.num_samples(64) == tokens // 64
    assert data.num_samples(64, ByteTokenizer()) == tokens // 64
    assert UserData("u", "tiny", "").num_samples(64) == 1
