"""The registry of training methods: which heads a method trains, on which sites, and what selects a round."""

from __future__ import annotations

from dataclasses import dataclass

from mdmt.errors import ConfigError

PROGNOSIS = "prognosis"
SEVERITY = "severity"
TASKS = (PROGNOSIS, SEVERITY)


@dataclass(frozen=True)
class Method:
    name: str
    tasks: tuple[str, ...]  # the heads this method trains
    monitor: str  # the task whose training-site validation loss selects the round
    pooled: bool = False  # centralised: the training sites' data pooled into one simulated site
    loco: bool = True  # reports a held-out prognosis centre
    init_from: str | None = None  # a method whose selected model this one starts from (same fold rule)
    per_site: bool = False  # one unit per training site, each trained on that site alone
    description: str = ""

    def trains(self, site_tasks: set[str]) -> bool:
        """Does a site holding labels for ``site_tasks`` take part in training?"""
        return bool(set(self.tasks) & site_tasks)


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("stl_prognosis", (PROGNOSIS,), PROGNOSIS, description="single task: prognosis sites only"),
        Method("stl_severity", (SEVERITY,), SEVERITY, loco=False, description="single task: severity sites only"),
        Method("mdmt", (PROGNOSIS, SEVERITY), PROGNOSIS, description="multi-dataset multi-task: all sites"),
        Method(
            "ft",
            (PROGNOSIS,),
            PROGNOSIS,
            init_from="stl_severity",
            description="fine-tuning: the selected stl_severity model, trained further on the prognosis sites",
        ),
        Method(
            "local",
            (PROGNOSIS,),
            PROGNOSIS,
            per_site=True,
            description="local only: each training prognosis site alone (one unit per site, 'local:<site>')",
        ),
        Method(
            "centralised_mdmt",
            (PROGNOSIS, SEVERITY),
            PROGNOSIS,
            pooled=True,
            description="MDMT on the training sites' data pooled into one simulated site (simulation only)",
        ),
    )
}


def get_method(name: str) -> Method:
    """A method by name; ``local:<site>`` is the local method's unit for one site."""
    try:
        return METHODS[name.split(":", 1)[0] if name.startswith("local:") else name]
    except KeyError:
        raise ConfigError(f"unknown method '{name}'; valid: {', '.join(METHODS)}") from None


def local_site(name: str) -> str | None:
    """The site of a ``local:<site>`` unit name, else None."""
    return name.split(":", 1)[1] if name.startswith("local:") else None


def role_tasks(role: str) -> set[str]:
    """Tasks a site with this role has labels for."""
    return {"prognosis": {PROGNOSIS}, "severity": {SEVERITY}, "both": {PROGNOSIS, SEVERITY}}[role]
