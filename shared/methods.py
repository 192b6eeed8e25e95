"""The registry of training methods: which heads a method trains, on which sites, and what selects a round."""

from __future__ import annotations

from dataclasses import dataclass

from shared.errors import ConfigError

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
    description: str = ""

    def trains(self, site_tasks: set[str]) -> bool:
        """Does a site holding labels for ``site_tasks`` take part in training?"""
        return bool(set(self.tasks) & site_tasks)

    def label_mask(self, site_tasks: set[str]) -> dict[str, bool]:
        """Which of the site's labels feed the loss under this method."""
        return {t: (t in self.tasks and t in site_tasks) for t in TASKS}


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("stl_prognosis", (PROGNOSIS,), PROGNOSIS, description="single task: prognosis sites only"),
        Method("stl_severity", (SEVERITY,), SEVERITY, loco=False, description="single task: severity sites only"),
        Method("mdmt", (PROGNOSIS, SEVERITY), PROGNOSIS, description="multi-dataset multi-task: all sites"),
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
    try:
        return METHODS[name]
    except KeyError:
        raise ConfigError(f"unknown method '{name}'; valid: {', '.join(METHODS)}") from None


def role_tasks(role: str) -> set[str]:
    """Tasks a site with this role has labels for."""
    return {"prognosis": {PROGNOSIS}, "severity": {SEVERITY}, "both": {PROGNOSIS, SEVERITY}}[role]
