"""``initscope report``: the papers' tables and curves from a results store. :mod:`.frames` reads the store
into pandas frames, :mod:`.papers` makes the tables (pure), :mod:`.results` writes the page and files."""

from initscope.experiments.tables.frames import (load_epochs, load_runs, load_selections, load_sweeps, select_runs,
                                                 varying_keys)
from initscope.experiments.tables.papers import (METRICS, Stat, Table, accuracy_table, build_tables, epoch_test_table,
                                                 html_table, markdown_table, marks, selection_table,
                                                 test_metrics_table)
from initscope.experiments.tables.results import Report, write_report

__all__ = ["METRICS", "Report", "Stat", "Table", "accuracy_table", "build_tables", "epoch_test_table", "html_table",
           "load_epochs", "load_runs", "load_selections", "load_sweeps", "markdown_table", "marks", "select_runs",
           "selection_table", "test_metrics_table", "varying_keys", "write_report"]
