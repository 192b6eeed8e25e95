"""MDMT federation: the machine-learning and data logic shared by the server and the clients.

Nothing in this package imports Flower's app classes; it is usable from a notebook.
"""

__version__ = "0.1.0"
