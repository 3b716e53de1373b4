"""Hierarchical aggregation (issue 15): one federation beyond one aggregator process.

* :mod:`.partial`: the pure math of partial aggregates (grouped by base version) and the root's fold;
* :mod:`.codec`: partials on the wire (one framed Kafka message, bounded decode);
* :mod:`.leaf`: ``pfi aggregator --role leaf``: validate, bound and fold a partition set's updates into
  partials, emitted with the consumed offsets in one Kafka transaction;
* :mod:`.root`: ``pfi aggregator --role root``: fold partials into versions, committed with the partials
  topic's offsets in one Redis script (the single aggregator's commit);
* :mod:`.poll_loop`: the poll/recover/back-off loop both roles run.

Why the result equals single-aggregator FedBuff, and why it is exactly once: see each module.
"""
