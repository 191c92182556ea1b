"""Training experiments, one subpackage per concern: ``config`` (what a run and a sweep are), ``data`` (the
sources), ``training`` (the loop), ``store`` (the results database), ``engines`` (what runs a sweep),
``tables`` (the papers' tables from a store); ``commands`` is their command line."""
