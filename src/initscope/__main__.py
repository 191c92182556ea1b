"""``python -m initscope``: the command line."""

from initscope.cli import app

if __name__ == "__main__":  # not when a worker process of `sweep --parallel` imports the main module again
    app()
