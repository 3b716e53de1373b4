"""The ``pfi`` entry point, above the edge SDK, the services and the harnesses (imported by none)."""
