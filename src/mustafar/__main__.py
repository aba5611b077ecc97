"""``python -m mustafar``: the same command line as ``mustafar``."""

from .cli import app

app(prog_name="mustafar")
