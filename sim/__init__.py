"""Harnesses that drive devices and services (never imported by either): the fleet simulator."""
