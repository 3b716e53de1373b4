"""modeling.retrieval: chunking, BM25, the real all-MiniLM-L6-v2, reciprocal rank fusion, hybrid search."""

from __future__ import annotations

import itertools
import threading

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from modeling.retrieval import (
    MINILM_NAME,
    Embedder,
    Hit,
    HybridIndex,
    LexicalIndex,
    RetrievalError,
    build_context,
    chunk_text,
    load_embedder,
    reciprocal_rank_fusion,
    tokenize,
)
from modeling.retrieval.ranking import top_k

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

NOTES = [
    "Dinner tonight: I roasted garlic, simmered a tomato sauce with basil and boiled the spaghetti.",
    "The quarterly budget review moved to Thursday; bring invoice QX-7731 for the auditors.",
    "We hiked up the ridge trail at dawn and watched the fog lift off the valley below.",
    "My cat naps on the warm laptop keyboard every afternoon and ignores the new bed.",
    "Booked the dentist for a cleaning next month, and the car is due for an oil change.",
    "Reading a novel about a lighthouse keeper who writes letters to the sea.",
]


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return load_embedder()


@pytest.fixture(scope="module")
def index(embedder: Embedder) -> HybridIndex:
    return HybridIndex(NOTES, embedder.embed(NOTES))


# -- chunking --------------------------------------------------------------------------------------
def test_chunks_overlap_and_offsets() -> None:
    words = [f"w{i}" for i in range(100)]
    text = "  ".join(words)
    chunks = chunk_text(text, max_words=10, overlap_words=3)
    for chunk in chunks:
        assert chunk.text == text[chunk.start : chunk.end]
        assert len(chunk.text.split()) <= 10
    assert [c.index for c in chunks] == list(range(len(chunks)))
    assert chunks[0].text.split() == words[:10]
    assert chunks[1].text.split()[:3] == words[7:10]  # 3 words of overlap
    assert chunks[-1].text.split()[-1] == "w99"
    assert len(chunks) == 14  # ceil((100 - 10) / 7) + 1


def test_chunking_covers_every_word_exactly_in_order() -> None:
    text = "alpha beta\tgamma\n\ndelta  epsilon"
    chunks = chunk_text(text, max_words=2, overlap_words=1)
    assert [c.text for c in chunks] == ["alpha beta", "beta\tgamma", "gamma\n\ndelta", "delta  epsilon"]


@pytest.mark.parametrize("text", ["", "   ", "\n\t \u3000"])
def test_no_words_no_chunks(text: str) -> None:
    assert chunk_text(text) == []


def test_unicode_offsets_are_characters() -> None:
    text = "café 😀 naïve 東京 タワー ü"
    chunks = chunk_text(text, max_words=3, overlap_words=1)
    assert chunks[0].text == "café 😀 naïve"
    for chunk in chunks:
        assert text[chunk.start : chunk.end] == chunk.text
    assert chunks[-1].text.endswith("ü")


def test_one_huge_word_is_cut_by_max_chars() -> None:
    text = "x" * 5000
    chunks = chunk_text(text, max_words=64, overlap_words=16, max_chars=1024)
    assert all(len(c.text) <= 1024 for c in chunks)
    assert "".join(c.text for c in chunks) == text  # pieces of one word do not overlap in characters
    assert chunks[-1].end == 5000


def test_max_chars_ends_a_chunk_early() -> None:
    text = " ".join(["a" * 300] * 8)
    chunks = chunk_text(text, max_words=64, overlap_words=16, max_chars=1000)
    assert all(len(c.text) <= 1000 for c in chunks)
    assert chunks[-1].end == len(text)
    assert all(b.start > a.start for a, b in itertools.pairwise(chunks))  # always progresses


@pytest.mark.parametrize(
    ("max_words", "overlap", "max_chars"), [(0, 0, 10), (4, 4, 10), (4, -1, 10), (4, 1, 0)]
)
def test_bad_chunk_parameters(max_words: int, overlap: int, max_chars: int) -> None:
    with pytest.raises(RetrievalError):
        chunk_text("a b c", max_words=max_words, overlap_words=overlap, max_chars=max_chars)


@FAST
@given(
    st.text(alphabet=st.sampled_from("ab cé\n😀\t"), max_size=400),
    st.integers(1, 12),
    st.integers(0, 11),
    st.integers(1, 40),
)
def test_chunking_properties(text: str, max_words: int, overlap: int, max_chars: int) -> None:
    overlap = min(overlap, max_words - 1)
    chunks = chunk_text(text, max_words=max_words, overlap_words=overlap, max_chars=max_chars)
    covered: set[int] = set()
    for chunk in chunks:
        assert text[chunk.start : chunk.end] == chunk.text
        assert len(chunk.text) <= max_chars
        assert chunk.text == chunk.text.strip()
        covered.update(range(chunk.start, chunk.end))
    assert all(i in covered for i, ch in enumerate(text) if not ch.isspace())


# -- lexical ---------------------------------------------------------------------------------------
def test_tokenize_lowercases_and_drops_stopwords() -> None:
    assert tokenize("The Cat, the HAT; and QX-7731!") == ["cat", "hat", "qx", "7731"]


def test_bm25_finds_the_rare_term() -> None:
    lexical = LexicalIndex.build(NOTES)
    hits = lexical.search("invoice QX-7731", 3)
    assert hits[0][0] == 1
    assert len(hits) == 1  # no other note shares a term
    assert hits[0][1] > 0


def test_bm25_prefers_more_matching_terms() -> None:
    texts = ["apple banana", "apple", "cherry"]
    hits = LexicalIndex.build(texts).search("apple banana", 5)
    assert [p for p, _ in hits] == [0, 1]
    assert hits[0][1] > hits[1][1]


@pytest.mark.parametrize("query", ["", "the and of", "zzzunknownzzz", "!!!"])
def test_bm25_query_without_known_terms_matches_nothing(query: str) -> None:
    assert LexicalIndex.build(NOTES).search(query, 5) == []


@pytest.mark.parametrize("texts", [[], [""], ["the and", "   "]])
def test_bm25_corpus_without_terms(texts: list[str]) -> None:
    lexical = LexicalIndex.build(texts)
    assert lexical.search("anything at all", 3) == []
    assert lexical.scores("anything").shape == (len(texts),)


# -- fusion ----------------------------------------------------------------------------------------
def test_rrf_math() -> None:
    fused = dict(reciprocal_rank_fusion([[3, 1, 2], [1, 4]], k=60))
    assert fused[1] == pytest.approx(1 / 62 + 1 / 61)
    assert fused[3] == pytest.approx(1 / 61)
    assert fused[2] == pytest.approx(1 / 63)
    assert fused[4] == pytest.approx(1 / 62)


def test_rrf_order_ties_and_duplicates() -> None:
    fused = reciprocal_rank_fusion([[5, 7], [7, 5], [9, 9, 9]], k=0)
    # 5 and 7: 1/1 + 1/2 each (tie -> lower position first); 9 counted once, at rank 1
    assert [p for p, _ in fused] == [5, 7, 9]
    assert fused[0][1] == pytest.approx(1.5)
    assert fused[2][1] == pytest.approx(1.0)
    assert reciprocal_rank_fusion([]) == []
    with pytest.raises(RetrievalError):
        reciprocal_rank_fusion([[1]], k=-1)


def test_top_k_is_deterministic_among_ties() -> None:
    scores = np.array([1.0, 3.0, 3.0, 2.0, 3.0, 3.0], dtype=np.float32)
    assert [p for p, _ in top_k(scores, 2)] == [1, 2]
    assert [p for p, _ in top_k(scores, 10)] == [1, 2, 4, 5, 3, 0]
    assert top_k(scores, 0) == []
    assert [p for p, _ in top_k(scores, 10, min_score=2.0)] == [1, 2, 4, 5]


# -- the real embedder -----------------------------------------------------------------------------
def test_minilm_embeddings(embedder: Embedder) -> None:
    vectors = embedder.embed(["hello world", "", "hello world"])
    assert embedder.name == MINILM_NAME
    assert vectors.shape == (3, 384) == (3, embedder.dim)
    assert vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(vectors[0], vectors[2], atol=1e-6)
    assert embedder.embed([]).shape == (0, 384)
    assert load_embedder() is embedder  # cached per process


def test_minilm_batching_does_not_change_results(embedder: Embedder) -> None:
    texts = [f"note {i}: " + "word " * (i * 7) for i in range(40)]  # several batches, varied lengths
    together = embedder.embed(texts)
    alone = np.stack([embedder.embed([t])[0] for t in texts[::9]])
    np.testing.assert_allclose(together[::9], alone, atol=1e-5)


def test_minilm_similarity_is_semantic(embedder: Embedder) -> None:
    a, b, c = embedder.embed(["a kitten sleeping", "a small cat taking a nap", "quarterly tax filing"])
    assert float(a @ b) > float(a @ c) + 0.2


def test_minilm_truncates_huge_and_odd_input(embedder: Embedder) -> None:
    vectors = embedder.embed(["word " * 200_000, "x" * 1_000_000, "lone \udcff surrogate", "\x00\x01"])
    assert vectors.shape == (4, 384)
    assert np.isfinite(vectors).all()


def test_embedder_is_thread_safe(embedder: Embedder) -> None:
    texts = ["the lighthouse keeper", "tomato sauce", "budget review", "a dawn hike"]
    expected = embedder.embed(texts)
    results: dict[int, np.ndarray] = {}
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            results[i] = embedder.embed(texts)
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    for got in results.values():
        np.testing.assert_allclose(got, expected, atol=1e-5)


# -- hybrid index ----------------------------------------------------------------------------------
def _search(index: HybridIndex, embedder: Embedder, query: str, k: int, mode: str) -> list[int]:
    return [hit.position for hit in index.search(query, embedder.embed([query])[0], k, mode)]  # type: ignore[arg-type]


def test_cooking_query_finds_the_cooking_note(index: HybridIndex, embedder: Embedder) -> None:
    for mode in ("hybrid", "dense"):
        assert _search(index, embedder, "what did I cook for the evening meal?", 3, mode)[0] == 0


def test_paraphrase_found_by_dense_not_lexical(index: HybridIndex, embedder: Embedder) -> None:
    query = "feline dozing on a computer"  # no term in common with note 3
    assert _search(index, embedder, query, 1, "dense") == [3]
    assert 3 not in _search(index, embedder, query, 6, "lexical")
    assert _search(index, embedder, query, 1, "hybrid") == [3]


def test_rare_term_found_by_lexical(index: HybridIndex, embedder: Embedder) -> None:
    assert _search(index, embedder, "QX-7731", 1, "lexical") == [1]
    assert _search(index, embedder, "QX-7731", 1, "hybrid") == [1]


def test_hit_fields_by_mode(index: HybridIndex, embedder: Embedder) -> None:
    vector = embedder.embed(["invoice QX-7731"])[0]
    hybrid = index.search("invoice QX-7731", vector, 2, "hybrid")
    assert hybrid[0].dense is not None
    assert hybrid[0].lexical is not None
    assert hybrid[0].score == pytest.approx(2 / 61)  # rank 1 in both lists
    assert hybrid[0].position == 1
    assert hybrid[0].dense == pytest.approx(float(vector @ embedder.embed([NOTES[1]])[0]), abs=1e-5)
    dense = index.search("invoice QX-7731", vector, 2, "dense")
    assert dense[0].lexical is None
    assert dense[0].score == dense[0].dense
    lexical = index.search("invoice QX-7731", None, 2, "lexical")
    assert lexical[0].dense is None
    assert lexical[0].score == lexical[0].lexical


def test_k_bounds(index: HybridIndex, embedder: Embedder) -> None:
    vector = embedder.embed(["anything"])[0]
    assert len(index.search("anything", vector, 100, "dense")) == len(NOTES)
    assert len(index.search("anything", vector, 100, "hybrid")) == len(NOTES)
    assert len(index.search("anything", vector, 1, "hybrid")) == 1
    with pytest.raises(RetrievalError):
        index.search("anything", vector, 0)
    with pytest.raises(RetrievalError):
        index.search("anything", vector, 3, "fuzzy")  # type: ignore[arg-type]


def test_bad_vectors_and_shapes(index: HybridIndex) -> None:
    with pytest.raises(RetrievalError):
        index.search("q", None, 3, "hybrid")
    with pytest.raises(RetrievalError):
        index.search("q", np.ones(10, dtype=np.float32), 3, "dense")
    with pytest.raises(RetrievalError):
        index.search("q", np.full(384, np.nan, dtype=np.float32), 3, "dense")
    with pytest.raises(RetrievalError):
        HybridIndex(["a", "b"], np.ones((3, 384), dtype=np.float32))
    with pytest.raises(RetrievalError):
        HybridIndex(["a"], np.full((1, 384), np.inf, dtype=np.float32))


def test_empty_index() -> None:
    index = HybridIndex([], np.zeros((0, 384), dtype=np.float32))
    assert len(index) == 0
    for mode in ("hybrid", "dense", "lexical"):
        assert index.search("q", np.ones(384, dtype=np.float32), 5, mode) == []


def test_search_is_deterministic_with_duplicate_chunks(embedder: Embedder) -> None:
    texts = ["same words here"] * 5 + ["other stuff entirely"]
    vectors = embedder.embed(texts)
    index = HybridIndex(texts, vectors)
    vector = embedder.embed(["same words"])[0]
    for mode in ("hybrid", "dense", "lexical"):
        first = index.search("same words", vector, 3, mode)
        assert [h.position for h in first] == [0, 1, 2]
        assert index.search("same words", vector, 3, mode) == first


def test_build_context() -> None:
    assert build_context(["first  ", "", "second"], max_chars=100) == "first\n\nsecond"
    assert build_context(["first", "second"], max_chars=8) == "first"
    assert build_context(["abcdefgh"], max_chars=3) == "abc"
    assert build_context(["abc"], max_chars=0) == ""
    assert build_context([], max_chars=10) == ""
    assert build_context(["one two three", "x"], max_chars=9) == "one two"  # cut at a word boundary
    assert build_context(["a", "one two three"], max_chars=10) == "a\n\none two"
    assert build_context(["one two three"], max_chars=8) == "one two"  # room ends just after a space
    assert build_context(["one two three"], max_chars=6) == "one"


@FAST
@given(st.lists(st.text(alphabet=st.sampled_from("ab \n😀"), max_size=30), max_size=6), st.integers(0, 60))
def test_build_context_never_exceeds_max_chars(chunks: list[str], max_chars: int) -> None:
    context = build_context(chunks, max_chars=max_chars)
    assert len(context) <= max_chars
    kept = [c.strip() for c in chunks if c.strip()]
    if kept and len(kept[0]) <= max_chars:
        assert context.startswith(kept[0])  # the most relevant chunk is never dropped when it fits


def test_index_searches_from_several_threads_agree(index: HybridIndex, embedder: Embedder) -> None:
    queries = ["dinner", "invoice QX-7731", "a sleeping cat", "hiking at dawn", "dentist", "lighthouse"]
    vectors = embedder.embed(queries)
    expected = [index.search(q, v, 3) for q, v in zip(queries, vectors, strict=True)]
    results: dict[int, list[list[Hit]]] = {}

    def work(i: int) -> None:
        results[i] = [index.search(q, v, 3) for _ in range(20) for q, v in zip(queries, vectors, strict=True)]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 4
    for got in results.values():
        assert got == expected * 20
