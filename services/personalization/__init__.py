"""The personalization service: base model + global adapter (merged, hot-swapped) + personal adapter
(unmerged, per request) behind an HTTP API. See ``ARCHITECTURE.md`` ("Personalization")."""
