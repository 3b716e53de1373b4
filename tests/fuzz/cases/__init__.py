"""A seeded generator of bad adapter updates, each with the dead-letter reason(s) it must produce.

:class:`CaseGenerator` builds a stream of :class:`Case` s for one federation (the *target*), in the order
they are to be produced to Kafka, interleaved with valid updates. It tracks how many valid updates came
before each case, so version-dependent cases (too stale, future base version, replays) are correct at
the moment the aggregator reads them: with one message key per federation every message of the target
lands on one partition, in order, and a buffer of K accepted updates is committed as the next version
before the next message is handled (``flush_timeout_s`` must be long enough that nothing flushes on time).

Three delivery paths:

* ``raw``: message values (bytes, or ``None`` for a tombstone) produced straight to the updates topic with
  an explicit key; each expectation names the message (index into ``messages``) whose partition/offset
  the dead-letter record must carry;
* ``sdk``: a signed envelope built with :func:`clients.updates.build_update` and sent by
  :class:`services.ingest.producer.UpdateProducer` (framed, chunked at ``chunk_bytes``); dead letters are
  matched by update id (several when every chunk is refused on arrival);
* ``refused``: bad input the SDK itself refuses with a typed error before anything is sent
  (:class:`RefusedCase`).

Poisoned updates (a valid signed delta of 100x the honest L2 norm) are dead-lettered with
NORM_EXCEEDED only under ``norm_policy="reject"``: the target federation of the fuzz test uses it. Under
the default ``norm_policy="clip"`` they are accepted and clipped to ``max_update_norm`` in the merge; the
guarantee there is a bound on the global's movement (``tests/fuzz/test_fuzz_poisoning.py``).

Layout: :mod:`.model` (what a case is), :mod:`.frames` (frame surgery), :mod:`.base` (the generator's
state and shared helpers), one mixin per family of categories (:mod:`.framing`, :mod:`.schema`,
:mod:`.forgery`, :mod:`.tensors`, :mod:`.chunks`, :mod:`.sdk`) and :mod:`.generator` (the mixes and the
stream).
"""

from tests.fuzz.cases.generator import RAW_MIX, SDK_MIX, STATEFUL, CaseGenerator, summary
from tests.fuzz.cases.model import RAW, SDK, Case, Limits, Party, RefusedCase

__all__ = [
    "RAW",
    "RAW_MIX",
    "SDK",
    "SDK_MIX",
    "STATEFUL",
    "Case",
    "CaseGenerator",
    "Limits",
    "Party",
    "RefusedCase",
    "summary",
]
