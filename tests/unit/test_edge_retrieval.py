"""clients.retrieval: one user's documents on the device (real MiniLM), isolation, deletion, corruption,
bad input; clients.retrieval_http: the score/generate calls that send the retrieved context."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from clients.http_source import HttpError
from clients.retrieval import MAX_CONTEXT_BYTES, MAX_DOCUMENT_CHARS, LocalRetriever
from clients.retrieval_http import generate_with_context, generate_with_local_retrieval, score_with_context
from clients.source import SourceError
from modeling.retrieval import Embedder, RetrievalError, load_embedder
from schemas.errors import ConfigError

COOKING = "Sunday: slow-roasted tomatoes with garlic and basil, then a pot of risotto for the family dinner."
INVOICE = "Reminder to send invoice QX-7731 to the auditors before the quarterly budget review."
HIKE = "We climbed the ridge trail at dawn and watched the fog lift off the valley."


class CountingEmbedder:
    """The real MiniLM, counting how many texts it embedded."""

    def __init__(self, inner: Embedder) -> None:
        self.inner = inner
        self.name = inner.name
        self.dim = inner.dim
        self.texts = 0

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        self.texts += len(texts)
        return self.inner.embed(texts)


@pytest.fixture(scope="module")
def minilm() -> Embedder:
    return load_embedder()


@pytest.fixture
def embedder(minilm: Embedder) -> CountingEmbedder:
    return CountingEmbedder(minilm)


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def _retriever(state: Path, user: str, embedder: Embedder) -> LocalRetriever:
    return LocalRetriever.for_user(state, user, embedder=embedder)


def test_add_search_context_and_permissions(tmp_path: Path, embedder: CountingEmbedder) -> None:
    retriever = _retriever(tmp_path, "alice", embedder)
    cooking = retriever.add(COOKING, doc_id="cooking", metadata={"source": "notes"})
    retriever.add(INVOICE, doc_id="invoice")
    retriever.add(HIKE, doc_id="hike")
    assert cooking.chunks == 1
    assert cooking.chars == len(COOKING)
    assert [d.id for d in retriever.documents()] == ["cooking", "invoice", "hike"]
    assert retriever.documents()[0].metadata == {"source": "notes"}

    hits = retriever.search("what did we eat for supper?", k=2)
    assert hits[0].doc_id == "cooking"
    assert hits[0].text == COOKING
    assert retriever.search("QX-7731", k=1, mode="lexical")[0].doc_id == "invoice"

    question = "what did we eat for supper?"
    context, used = retriever.context_for(question, k=3, max_chars=len(COOKING) + 9)
    assert context == COOKING  # 7 characters left: no whole word of the second hit fits
    assert [h.doc_id for h in used] == ["cooking"]
    context, used = retriever.context_for(question, k=3, max_chars=len(COOKING) + 10)
    second = used[1].text.split()[0]
    assert context == f"{COOKING}\n\n{second}"  # 8 left: the second hit's first word ("Reminder"/"We")
    assert len(used) == 2

    directory = tmp_path / "alice" / "documents"
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    for path in directory.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path


def test_reload_uses_stored_embeddings(tmp_path: Path, embedder: CountingEmbedder) -> None:
    first = _retriever(tmp_path, "alice", embedder)
    first.add(COOKING, doc_id="cooking")
    first.add(HIKE, doc_id="hike")
    expected = first.search("a morning walk in the hills", k=2)
    embedded = embedder.texts
    again = _retriever(tmp_path, "alice", embedder)
    assert again.search("a morning walk in the hills", k=2) == expected
    assert embedder.texts == embedded + 1  # only the query: the chunks' vectors were read from disk


def test_users_are_isolated(tmp_path: Path, embedder: CountingEmbedder) -> None:
    alice = _retriever(tmp_path, "alice", embedder)
    bob = _retriever(tmp_path, "bob", embedder)
    alice.add(COOKING, doc_id="shared-id")
    bob.add(INVOICE, doc_id="shared-id")
    assert [h.text for h in alice.search("invoice auditors QX-7731", k=5)] == [COOKING]
    assert [h.text for h in bob.search("risotto dinner", k=5)] == [INVOICE]
    assert alice.delete("shared-id")
    assert alice.documents() == []
    assert [d.id for d in bob.documents()] == ["shared-id"]
    assert bob.text("shared-id") == INVOICE
    for bad_user in ("../bob", "bob/../alice", "", ".hidden", "a" * 200):
        with pytest.raises(ConfigError):
            LocalRetriever.for_user(tmp_path, bad_user, embedder=embedder)


def test_delete_leaves_nothing_behind(tmp_path: Path, embedder: CountingEmbedder) -> None:
    retriever = _retriever(tmp_path, "alice", embedder)
    retriever.add(COOKING, doc_id="cooking")
    retriever.add(INVOICE, doc_id="invoice")
    assert retriever.delete("cooking")
    assert not retriever.delete("cooking")
    assert _files(tmp_path / "alice" / "documents") == ["invoice.json", "invoice.npy"]
    assert all(h.doc_id == "invoice" for h in retriever.search("risotto tomatoes basil", k=5))
    assert "risotto" not in " ".join(
        p.read_text("utf-8", "replace") for p in tmp_path.rglob("*") if p.is_file()
    )

    assert retriever.delete_all() == 1
    assert _files(tmp_path) == ["alice"]  # the documents directory is gone, no temp file anywhere
    assert retriever.documents() == []
    assert retriever.search("invoice", k=3) == []
    assert _retriever(tmp_path, "alice", embedder).documents() == []


def test_replacing_a_document_keeps_one_copy(tmp_path: Path, embedder: CountingEmbedder) -> None:
    retriever = _retriever(tmp_path, "alice", embedder)
    retriever.add(COOKING, doc_id="note")
    retriever.add(HIKE, doc_id="note")
    assert [d.id for d in retriever.documents()] == ["note"]
    assert [h.text for h in retriever.search("risotto", k=5)] == [HIKE]


def test_long_document_is_chunked_with_offsets(tmp_path: Path, embedder: CountingEmbedder) -> None:
    text = " ".join(f"word{i}" for i in range(150)) + " the secret ingredient is saffron"
    retriever = _retriever(tmp_path, "alice", embedder)
    info = retriever.add(text, doc_id="long")
    assert info.chunks == 3  # 155 words: windows of 64 words starting every 48 (0, 48, 96)
    hit = retriever.search("saffron", k=1, mode="lexical")[0]
    assert hit.chunk_id == 2
    assert hit.text.endswith("saffron")


def test_corrupt_files_give_a_clear_error_and_can_be_deleted(
    tmp_path: Path, embedder: CountingEmbedder
) -> None:
    retriever = _retriever(tmp_path, "alice", embedder)
    retriever.add(COOKING, doc_id="good")
    retriever.add(HIKE, doc_id="bad")
    directory = tmp_path / "alice" / "documents"
    (directory / "bad.json").write_bytes(b"\xff\xfe not json")
    with pytest.raises(ConfigError, match=r"corrupt document file .*bad\.json"):
        _retriever(tmp_path, "alice", embedder).documents()

    (directory / "bad.json").write_text(json.dumps(["a", "list"]), encoding="utf-8")
    with pytest.raises(ConfigError, match="corrupt document file"):
        _retriever(tmp_path, "alice", embedder).documents()

    retriever.add(HIKE, doc_id="bad")
    np.save(directory / "bad.npy", np.zeros((5, 384), dtype=np.float32))  # wrong number of chunks
    with pytest.raises(ConfigError, match="corrupt embeddings"):
        _retriever(tmp_path, "alice", embedder).documents()

    (directory / "bad.npy").write_bytes(b"\x93NUMPY truncated")
    with pytest.raises(ConfigError, match="corrupt document file"):
        _retriever(tmp_path, "alice", embedder).search("x", k=1)

    fresh = _retriever(tmp_path, "alice", embedder)
    assert fresh.delete("bad")  # deleting needs no parse
    assert [d.id for d in fresh.documents()] == ["good"]


def test_orphan_embeddings_of_a_crashed_add_are_removed(tmp_path: Path, embedder: CountingEmbedder) -> None:
    retriever = _retriever(tmp_path, "alice", embedder)
    retriever.add(COOKING, doc_id="good")
    directory = tmp_path / "alice" / "documents"
    np.save(directory / "crashed.npy", np.zeros((1, 384), dtype=np.float32))
    assert [d.id for d in _retriever(tmp_path, "alice", embedder).documents()] == ["good"]
    assert _files(directory) == ["good.json", "good.npy"]


def test_a_directory_open_to_others_is_refused(tmp_path: Path, embedder: CountingEmbedder) -> None:
    retriever = _retriever(tmp_path, "alice", embedder)
    retriever.add(COOKING, doc_id="good")
    os.chmod(tmp_path / "alice" / "documents", 0o755)
    with pytest.raises(ConfigError, match="open to others"):
        _retriever(tmp_path, "alice", embedder).documents()


@pytest.mark.parametrize(
    ("text", "doc_id", "metadata"),
    [
        ("", None, None),
        ("   \n\t ", None, None),
        ("x" * (MAX_DOCUMENT_CHARS + 1), None, None),
        ("bad \udcff surrogate", None, None),
        ("fine", "../escape", None),
        ("fine", "a/b", None),
        ("fine", "", None),
        ("fine", ".hidden", None),
        ("fine", None, {f"k{i}": "v" for i in range(17)}),
        ("fine", None, {"k": "v" * 257}),
    ],
)
def test_bad_documents_are_refused(
    tmp_path: Path, embedder: CountingEmbedder, text: str, doc_id: str | None, metadata: dict[str, str] | None
) -> None:
    retriever = _retriever(tmp_path, "alice", embedder)
    with pytest.raises(RetrievalError):
        retriever.add(text, doc_id=doc_id, metadata=metadata)
    assert not (tmp_path / "alice").exists() or _files(tmp_path / "alice") in ([], ["documents"])


def test_bad_search_arguments(tmp_path: Path, embedder: CountingEmbedder) -> None:
    retriever = _retriever(tmp_path, "alice", embedder)
    retriever.add(COOKING, doc_id="good")
    for k in (0, -1, 33):
        with pytest.raises(RetrievalError):
            retriever.search("q", k=k)
    for max_chars in (0, MAX_CONTEXT_BYTES + 1):
        with pytest.raises(RetrievalError):
            retriever.context_for("q", max_chars=max_chars)
    with pytest.raises(RetrievalError):
        retriever.search("q", k=1, mode="fuzzy")  # type: ignore[arg-type]
    with pytest.raises(RetrievalError):
        retriever.search("q" * 4097, k=1)
    with pytest.raises(RetrievalError):
        retriever.delete("../../etc/passwd")
    assert retriever.search("lone \udcff surrogate", k=1)[0].doc_id == "good"
    assert _retriever(tmp_path, "nobody", embedder).context_for("anything") == ("", [])


# -- the HTTP calls --------------------------------------------------------------------------------
def _service(seen: list[tuple[str, dict[str, Any], str]], status: int = 200) -> httpx.MockTransport:
    def handle(request: httpx.Request) -> httpx.Response:
        seen.append((request.url.path, json.loads(request.content), request.headers["Authorization"]))
        if status != 200:
            return httpx.Response(status, json={"error": {"code": "invalid", "message": "context too long"}})
        return httpx.Response(200, json={"ok": True})

    return httpx.MockTransport(handle)


async def test_score_and_generate_send_the_context() -> None:
    seen: list[tuple[str, dict[str, Any], str]] = []
    async with httpx.AsyncClient(transport=_service(seen), base_url="http://svc") as client:
        assert await score_with_context(client, "tok", "fed1", ["a text"], "ctx") == {"ok": True}
        await generate_with_context(client, "tok", "fed1", "a prompt", "ctx", seed=7, max_new_tokens=5)
    (score_path, score_body, auth), (gen_path, gen_body, _) = seen
    assert score_path == "/v1/federations/fed1/score"
    assert score_body == {"texts": ["a text"], "context": "ctx", "use_personal": True}
    assert auth == "Bearer tok"
    assert gen_path == "/v1/federations/fed1/generate"
    assert gen_body["prompt"] == "a prompt"
    assert gen_body["context"] == "ctx"
    assert gen_body["seed"] == 7
    assert gen_body["max_new_tokens"] == 5
    assert "user_id" not in gen_body  # unset options are not sent


async def test_an_empty_context_is_not_sent() -> None:
    seen: list[tuple[str, dict[str, Any], str]] = []
    async with httpx.AsyncClient(transport=_service(seen), base_url="http://svc") as client:
        await score_with_context(client, "tok", "fed1", ["a text"], "")
        await generate_with_context(client, "tok", "fed1", "a prompt", "")
    assert all("context" not in body for _, body, _ in seen)


def test_context_is_bounded_in_utf8_bytes(tmp_path: Path, embedder: CountingEmbedder) -> None:
    retriever = _retriever(tmp_path, "alice", embedder)
    word = "東京タワー" * 3  # 3 UTF-8 bytes a character; 64 such words make a 1023-character chunk
    retriever.add(" ".join([word] * 2048), doc_id="tokyo")
    context, hits = retriever.context_for("東京タワー", k=32, max_chars=64 * 1024)
    assert len(context.encode("utf-8")) <= 64 * 1024
    assert len(context) > 20_000  # still nearly full
    assert hits


async def test_generate_with_local_retrieval(tmp_path: Path, embedder: CountingEmbedder) -> None:
    retriever = _retriever(tmp_path, "alice", embedder)
    retriever.add(COOKING, doc_id="cooking")
    retriever.add(INVOICE, doc_id="invoice")
    seen: list[tuple[str, dict[str, Any], str]] = []
    async with httpx.AsyncClient(transport=_service(seen), base_url="http://svc") as client:
        answer, hits = await generate_with_local_retrieval(
            client, "tok", "fed1", retriever, "which invoice goes to the auditors?", k=1
        )
    assert answer == {"ok": True}
    assert [h.doc_id for h in hits] == ["invoice"]
    assert seen[0][1]["context"] == INVOICE


async def test_http_errors() -> None:
    async with httpx.AsyncClient(transport=_service([], status=422), base_url="http://svc") as client:
        with pytest.raises(HttpError, match="context too long") as caught:
            await score_with_context(client, "tok", "fed1", ["t"], "ctx")
    assert caught.value.status == 422

    def down(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    async with httpx.AsyncClient(transport=httpx.MockTransport(down), base_url="http://svc") as client:
        with pytest.raises(SourceError):
            await generate_with_context(client, "tok", "fed1", "p", "ctx")


def test_documents_of_another_embedder_are_re_embedded(tmp_path: Path, embedder: CountingEmbedder) -> None:
    old = CountingEmbedder(embedder.inner)
    old.name = "some-older-model"
    _retriever(tmp_path, "alice", old).add(COOKING, doc_id="cooking")
    fresh = _retriever(tmp_path, "alice", embedder)
    assert fresh.search("tomatoes", k=1)[0].doc_id == "cooking"
    assert embedder.texts == 2  # the document's one chunk, then the query
    record = json.loads((tmp_path / "alice" / "documents" / "cooking.json").read_text("utf-8"))
    assert record["embedder"] == embedder.name
    _retriever(tmp_path, "alice", embedder).search("tomatoes", k=1)
    assert embedder.texts == 3  # stored again: only the query this time
