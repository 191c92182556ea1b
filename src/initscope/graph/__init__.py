"""Tracing a model and propagating statistics through its graph."""
