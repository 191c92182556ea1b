"""A model constructor for the CLI tests (``--model tests_audit_models:plain8``)."""

from initscope.models import create_model


def plain8():
    return create_model("plain34", width=8, num_classes=10)
