"""Where results go: the SQLite results store (:class:`Store`) and the checks, before anything trains,
that its folders can be written (:func:`check_output`)."""

from initscope.experiments.store.preflight import check_output
from initscope.experiments.store.sqlite import DEFAULT_LEASE_S, DONE, STATUSES, Claim, Owner, Store

__all__ = ["DEFAULT_LEASE_S", "DONE", "STATUSES", "Claim", "Owner", "Store", "check_output"]
