"""Initialization methods: objects in a registry, each setting every weight layer's std its own way.

Importing this package registers the built-in methods, in listing order: ``xavier``,
``kaiming-forward``, ``kaiming-backward`` (:mod:`.classic`); ``asv-forward``, ``asv-backward`` and
their exact variants (:mod:`.asv`); ``asv-balanced`` (:mod:`.balanced`); ``lecun``, ``orthogonal``
and ``default`` (:mod:`.peers`); ``lsuv`` (:mod:`.lsuv`, data-dependent) and ``fixup``
(:mod:`.fixup`, residual nets without normalization). :func:`register_method` adds one.
"""

from initscope.methods.base import METHODS, Layer, Method, get_method, register_method, unregister_method
from initscope.methods import classic, asv, balanced, peers, lsuv, fixup  # noqa: F401, E402  (the built-ins, in listing order)

__all__ = ["METHODS", "Layer", "Method", "get_method", "register_method", "unregister_method"]
