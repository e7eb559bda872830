"""Plumbing every stage shares: whole-or-nothing files, random streams, provenance, GPU slots, the config schema's defaults."""
