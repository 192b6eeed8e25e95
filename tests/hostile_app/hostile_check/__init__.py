"""A test ClientApp: the project's ClientApp with one hostile site (tests/test_hostile_replies.py, which
writes the app's pyproject.toml from mdmt.ops.flwr_app's manifest with this ClientApp in a copy of the
folder, so that the run-config keys are always the schema's)."""
