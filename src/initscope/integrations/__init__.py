"""Integrations with training frameworks (each an optional extra): :mod:`.lightning`."""
