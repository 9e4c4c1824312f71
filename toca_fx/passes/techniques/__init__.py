"""Per-site techniques: one module each, registered by the class they define.

A technique says, for one residual-branch site on a non-fresh step:

* ``possible(site)`` — whether the analysis allows it (a falsy ``Refusal`` when not);
* ``applies(site, k, config)`` — whether the planner picks it (techniques are asked in ``priority``
  order; the first that applies wins);
* ``buffers(site, config)`` — state it needs beyond the site's F and staleness (``StateSpec``s the
  fresh pass fills);
* ``rewrite(p, site)`` — how the partial pass rewrites F (``p`` is a ``passes.partial.PartialPass``);
* ``on_refresh(p, site, f)`` — what it updates when every token of the site was computed;
* ``tokens(site, k)`` and ``stats_label`` — how ``stats()`` counts it.

Adding a technique is one new module in this folder that calls ``register`` (modules are found
and imported automatically) plus its config entry and tests. See ARCHITECTURE.md for a worked example.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import ClassVar

from ...analysis.sites import Site
from ...errors import Refusal
from ..bindings import Buffer, StateSpec

TECHNIQUES: dict[str, "Technique"] = {}
_ORDER: list["Technique"] = []


class Technique:
    """Base class: a technique that applies nowhere and rewrites nothing."""

    name: ClassVar[str]
    priority: ClassVar[int]             # lower is asked first by the planner
    stats_label: ClassVar[str]          # the column of stats() it counts in
    uses_k: ClassVar[bool] = False      # takes k (the site's token count on this call)

    def possible(self, site: Site) -> Refusal | bool:
        return True

    def applies(self, site: Site, k: int, config) -> bool:
        return False

    def buffers(self, site: Site, config) -> list[StateSpec]:
        return []

    def rewrite(self, p, site: Site) -> None:
        raise NotImplementedError

    def on_refresh(self, p, site: Site, f) -> None:
        """Every token of ``site`` was computed (node ``f``: a fresh step, or ``full``): update the
        technique's own state in the graph. Called for every registered technique."""

    def tokens(self, site: Site, k: int) -> int:
        return k if self.uses_k else site.n_tokens


def needs_local(site: Site) -> Refusal | bool:
    """True for a token-local site; else the refusal every token-wise technique gives."""
    return site.local or Refusal("not-local", f"site {site.name} is not token-local ({site.reason})")


def register(technique: Technique) -> Technique:
    if technique.name in TECHNIQUES:
        raise ValueError(f"technique {technique.name!r} is registered twice")
    TECHNIQUES[technique.name] = technique
    _ORDER.append(technique)
    _ORDER.sort(key=lambda t: t.priority)
    return technique


def choose(site: Site, k: int, config) -> Technique:
    """The technique of ``site`` on a partial step with ``k`` tokens: the first that applies."""
    for t in _ORDER:
        if t.applies(site, k, config):
            return t
    raise LookupError(f"no technique applies to site {site.name}")


def refresh(p, site: Site, f) -> None:
    """Let every technique update its own state after all of ``site`` was computed (node ``f``)."""
    for t in _ORDER:
        t.on_refresh(p, site, f)


def site_state(site: Site, config) -> list[StateSpec]:
    """Every buffer of a cacheable site: F, the staleness counters, then each technique's own."""
    specs = [StateSpec(Buffer(site.name, "value"), site.value),
             StateSpec(Buffer(site.name, "stale"), None, site.n_tokens)]
    for t in _ORDER:
        for spec in t.buffers(site, config):
            if spec not in specs:
                specs.append(spec)
    return specs


for _m in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_m.name}")
