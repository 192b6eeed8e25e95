"""``mdmt deploy``: what a coordinator and a hospital install.

- :mod:`~mdmt.ops.deploy.cli`: the verbs and their argparse wiring (``add_arguments``);
- :mod:`~mdmt.ops.deploy.pki`: the CA, the SuperLink's TLS certificate and the sites' keys (imports ``cryptography``);
- :mod:`~mdmt.ops.deploy.siteconfig`: a site's config file and the checks of its values;
- :mod:`~mdmt.ops.deploy.commands`: the ``flower-superlink`` / ``flower-supernode`` command lines, the ``flwr``
  CLI's connection;
- :mod:`~mdmt.ops.deploy.checks`: what a site checks before joining;
- :mod:`~mdmt.ops.deploy.network`: the systemd drop-in that lets a site's SuperNode reach only the coordinator;
- :mod:`~mdmt.ops.deploy.files`: the certificate folder's layout, the CA key's own folder, and how secrets and
  public files are written.

This package re-exports nothing: :mod:`mdmt.ops.jobs` imports :mod:`~mdmt.ops.deploy.commands` and the
``cli`` module imports :mod:`mdmt.ops.jobs`, so importing ``cli`` here would make an import cycle.
"""
