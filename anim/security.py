"""Who is asking, and what they may see (docs/security.md).

A :class:`Principal` is the caller of one request or association: a DICOM AE, the
subject of an OAuth 2.0 token, or the local operator (the embedded default without
authentication, and the command line). Its institution decides what the query engine
shows it (:class:`Viewer`); its actions what it may do.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from anim.config import Config


class Action(enum.StrEnum):
    READ = "read"  # query and retrieve
    WRITE = "write"  # store
    ADMIN = "admin"  # delete, quarantine, revoke, audit


ALL_ACTIONS = frozenset(Action)


@dataclass(frozen=True, slots=True)
class Principal:
    kind: str  # "ae" | "token" | "local"
    subject: str  # AE title, token "sub", or "local"
    institution: str  # "" for the local operator
    address: str = ""  # peer IP address
    actions: frozenset[Action] = ALL_ACTIONS

    def may(self, action: Action) -> bool:
        return action in self.actions


LOCAL = Principal(kind="local", subject="local", institution="")


@dataclass(frozen=True, slots=True)
class Viewer:
    """The filter the query engine applies for one caller: a study is visible when one
    of the institutions it sees sent some of its current content, or a sharing rule
    names the study or its patient for the caller's institution."""

    institution: str
    sees: frozenset[str]  # institutions whose studies it sees (its own included)
    shared_studies: frozenset[str] = frozenset()
    shared_patients: frozenset[tuple[str, str]] = frozenset()  # (issuer, patient id)
    national: bool = False  # sees every study, but for patients' restrictions


def viewer_for(principal: Principal, cfg: Config) -> Viewer | None:
    """None when the caller sees everything: tenancy off, the local operator, or an
    institution with a national role."""
    if not cfg.security.tenancy or principal.kind == "local":
        return None
    sees = {principal.institution}
    national = False
    for rule in cfg.security.institutions:
        if rule.name == principal.institution:
            national = national or rule.national
            sees |= rule.sees
    mine = [r for r in cfg.security.shares if principal.institution in r.institutions]
    return Viewer(
        institution=principal.institution, sees=frozenset(sees), national=national,
        shared_studies=frozenset(r.study_uid for r in mine if r.study_uid),
        shared_patients=frozenset((r.issuer, r.patient_id) for r in mine if r.patient_id))
