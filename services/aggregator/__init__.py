"""Aggregator service: merges client adapter deltas into versioned global adapters."""
