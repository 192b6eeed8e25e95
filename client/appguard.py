"""The ``flwr-clientapp`` of a site whose SuperNode ``mdmt deploy supernode-cmd`` started: Flower's own
ClientApp process, with the run's app bundle (FAB) checked against the site's ``approved-app`` BEFORE the
bundle is unpacked or any of its code imported (:mod:`mdmt.fed.approved`).

How: Flower's SuperExec starts one ``flwr-clientapp --token ...`` per message, by name, from PATH
(``flwr.supercore.superexec.executor.subprocess_executor.SubprocessExecutor.launch``); the site's PATH starts
with a folder holding a ``flwr-clientapp`` that runs :func:`main` (:mod:`mdmt.ops.deploy.appguard`). Two
steps of ``flwr.supernode.runtime.run_clientapp.run_clientapp`` are wrapped: ``pull_task_input`` (the
message, context, run and FAB, pulled from the SuperNode) and ``install_from_fab`` (which unpacks the bundle,
called right after). Another bundle raises in the second, inside Flower's own error handling, so the run
gets an error reply (the reason) and the app is never unpacked, loaded or run: it touches no data.

Fails closed: where Flower's module no longer has these two steps (an upgrade renamed them), every message
is refused with a line saying so, rather than run unchecked.
"""

from __future__ import annotations

import sys

from mdmt.fed.approved import APPROVED_APP, verdict

CLIENTAPP = "flwr-clientapp"
STEPS = ("pull_task_input", "install_from_fab")


class AppNotApproved(RuntimeError):
    """The run's app bundle is not the one this site approved."""


def wrap(module) -> None:
    """Check the pulled bundle in ``module`` (flwr.supernode.runtime.run_clientapp) before it is unpacked."""
    pulled: dict[str, object] = {}
    pull, install = module.pull_task_input, module.install_from_fab

    def pull_task_input(client):
        message, context, run, fab = pull(client)
        pulled["context"] = context
        return message, context, run, fab

    def install_from_fab(content, *args, **kwargs):
        node = dict(getattr(pulled.get("context"), "node_config", None) or {})
        why = verdict(str(node.get(APPROVED_APP, "") or ""), bytes(content), str(node.get("site", "")))
        if why:
            raise AppNotApproved(why)
        return install(content, *args, **kwargs)

    module.pull_task_input, module.install_from_fab = pull_task_input, install_from_fab


def main() -> int:
    """``flwr-clientapp`` with the approved-app check (the arguments are Flower's own)."""
    # deferred: Flower's ClientApp process module, imported only in the process this script becomes
    import flwr.supernode.runtime.run_clientapp as rc

    if not all(callable(getattr(rc, name, None)) for name in STEPS):
        print(
            f"{CLIENTAPP}: this Flower's run_clientapp has no {' / '.join(STEPS)} step; the approved-app "
            "check cannot run, so no app is run (update mdmt.client.appguard for this Flower)",
            file=sys.stderr,
        )
        return 2
    wrap(rc)
    # deferred: Flower's own command-line entry point, after the wrap
    from flwr.supernode.cli import flwr_clientapp

    sys.argv[0] = CLIENTAPP
    flwr_clientapp()
    return 0
