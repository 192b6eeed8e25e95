"""``mdmt dashboard``: a local web dashboard over one or more run stores (Dash/Plotly, every asset local).

Importing this package does not import Dash (an optional extra): the ``mdmt`` CLI can register the verb
with :func:`add_arguments` and call :func:`run` without it, and gets a one-line error if Dash is missing.
"""

from mdmt.results.dashboard.cli import add_arguments, main, run, serve

__all__ = ["add_arguments", "main", "run", "serve"]
