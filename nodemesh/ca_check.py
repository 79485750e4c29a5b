"""`nodemesh check` (without --pre): is the mesh's identity material valid, and for how long?

Pure verdicts over certificates and a clock (`check_anchors`, `check_issuer`, `check_leaves`), and
the loading of the material (a CA directory or PEM files; in the lab, the lab's CA directory and
each agent's /identity answer). Levels and thresholds:

  trust anchor  error: expired, not yet valid, not a CA;      warn: expires in < 30 days
  issuer        error: expired, not yet valid, not a CA, not signed by any anchor in the bundle,
                       key not matching the certificate;       warn: expires in < 7 days
  workload leaf error: expired;  warn: past its renewal point (70% of its lifetime: the agent's
                       renewal is late) or issued by an issuer other than the current one

Exit codes of the command: 0 every check ok, 1 warnings only, 2 at least one error (scripts can
`nodemesh check || alert`, or tell the two apart). `nodemesh check --pre` keeps its own 0 / 3.
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from nodemesh.controller.ca import _signed_by  # noqa: PLC2701  (one signature check for the CA and the checker)

ANCHOR_WARN = 30 * 86400.0
ISSUER_WARN = 7 * 86400.0
RENEW_FRACTION = 0.7  # the agent renews at 70% of a leaf's lifetime (agent/identity.py)
LEVELS = ("ok", "warn", "error")
EXIT_CODES = {"ok": 0, "warn": 1, "error": 2}


@dataclass(frozen=True)
class Finding:
    level: str  # ok | warn | error
    kind: str  # trust-anchor | issuer | leaf | source
    subject: str  # certificate subject / SPIFFE ID / file
    not_after: str  # ISO time, "" when unknown
    detail: str  # one sentence a person can act on
    where: str = ""  # file or node it came from


def worst(findings: Iterable[Finding]) -> str:
    return max((f.level for f in findings), key=LEVELS.index, default="ok")


def exit_code(findings: Iterable[Finding]) -> int:
    return EXIT_CODES[worst(findings)]


def _left(seconds: float) -> str:
    if seconds >= 2 * 86400:
        return f"{seconds / 86400:.0f} days"
    if seconds >= 7200:
        return f"{seconds / 3600:.0f} hours"
    return f"{max(seconds, 0) / 60:.0f} minutes"


def _validity(cert: x509.Certificate, kind: str, warn_within: float, now: float, where: str) -> Finding:
    subject = cert.subject.rfc4514_string()
    na, nb = cert.not_valid_after_utc, cert.not_valid_before_utc
    left = na.timestamp() - now
    if left <= 0:
        return Finding("error", kind, subject, na.isoformat(), f"expired {_left(-left)} ago: replace it", where)
    if nb.timestamp() > now:
        return Finding("error", kind, subject, na.isoformat(), f"not valid before {nb:%Y-%m-%d %H:%M:%SZ} (a clock or issuance problem)", where)
    try:
        ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        ca = False
    if not ca:
        return Finding("error", kind, subject, na.isoformat(), "is not a CA certificate (basicConstraints ca=false)", where)
    if left < warn_within:
        return Finding("warn", kind, subject, na.isoformat(), f"expires in {_left(left)} (< {_left(warn_within)}): rotate it now", where)
    return Finding("ok", kind, subject, na.isoformat(), f"valid for {_left(left)}", where)


def check_anchors(anchors: Sequence[x509.Certificate], now: float, where: str = "") -> list[Finding]:
    if not anchors:
        return [Finding("error", "trust-anchor", "-", "", "the trust bundle holds no certificate", where)]
    return [_validity(a, "trust-anchor", ANCHOR_WARN, now, where) for a in anchors]


def check_issuer(issuer: x509.Certificate, anchors: Sequence[x509.Certificate], now: float, key: Any = None, where: str = "") -> Finding:
    f = _validity(issuer, "issuer", ISSUER_WARN, now, where)
    if f.level == "error":
        return f
    if not any(_signed_by(issuer, a) for a in anchors):
        return Finding("error", "issuer", f.subject, f.not_after, "is not signed by any trust anchor in the bundle (wrong chain): "
                       "workloads will not trust certificates it issues", where)
    if key is not None and key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo) != \
            issuer.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo):
        return Finding("error", "issuer", f.subject, f.not_after, "the issuer key does not belong to the issuer certificate", where)
    signer = next(a for a in anchors if _signed_by(issuer, a))
    if f.level == "ok" and issuer.not_valid_after_utc > signer.not_valid_after_utc:
        return Finding("warn", "issuer", f.subject, f.not_after,
                       f"outlives its trust anchor (anchor expires {signer.not_valid_after_utc:%Y-%m-%d}): it is usable only until then", where)
    return f


def _parse_time(value: Any) -> dt.datetime:
    t = dt.datetime.fromisoformat(str(value))
    return t if t.tzinfo is not None else t.replace(tzinfo=dt.timezone.utc)


def check_leaves(nodes: Sequence[Mapping[str, Any]], issuer_subject: str | None, now: float) -> list[Finding]:
    """Agents' /identity answers ({"node", "certificates": [...]} or {"node", "error"})."""
    out = []
    for n in nodes:
        node = str(n.get("node", "?"))
        if "error" in n:
            out.append(Finding("error", "source", f"agent {node}", "", f"cannot read its certificates: {n['error']}", node))
            continue
        for c in n.get("certificates", ()):
            ident = str(c.get("identity", "?"))
            try:
                na, nb = _parse_time(c["not_after"]), _parse_time(c.get("not_before", c["not_after"]))
            except (KeyError, ValueError) as exc:
                out.append(Finding("error", "leaf", ident, "", f"unreadable validity in the agent's answer ({exc})", node))
                continue
            left = na.timestamp() - now
            renew = nb.timestamp() + RENEW_FRACTION * (na.timestamp() - nb.timestamp())
            if left <= 0:
                f = Finding("error", "leaf", ident, na.isoformat(), f"expired {_left(-left)} ago: the agent cannot renew it (controller reachable? CSR refused?)", node)
            elif "not_before" in c and now > renew + 5:
                f = Finding("warn", "leaf", ident, na.isoformat(), f"past its renewal point by {_left(now - renew)}: renewal is failing", node)
            elif issuer_subject and c.get("issuer") and c["issuer"] != issuer_subject:
                f = Finding("warn", "leaf", ident, na.isoformat(), f"issued by {c['issuer']}, not the current issuer (renews onto it at the next renewal)", node)
            else:
                f = Finding("ok", "leaf", ident, na.isoformat(), f"valid for {_left(left)}", node)
            out.append(f)
    return out


# ---- loading (IO) ----------------------------------------------------------------------------


def _load(path: str, what: str) -> tuple[list[x509.Certificate], Finding | None]:
    try:
        with open(path, "rb") as f:
            data = f.read()
        certs = x509.load_pem_x509_certificates(data)
        return certs, None
    except OSError as exc:
        return [], Finding("error", "source", path, "", f"the {what} cannot be read: {exc.strerror or exc}", path)
    except ValueError as exc:
        return [], Finding("error", "source", path, "", f"the {what} is not PEM certificates ({exc})", path)


def check_files(anchor_path: str, issuer_path: str | None, now: float, issuer_key_path: str | None = None) -> tuple[list[Finding], str | None]:
    """Findings for a trust bundle file and an issuer certificate (and key) file; and the issuer's
    subject (to judge leaves against), None when there is no readable issuer."""
    anchors, err = _load(anchor_path, "trust anchor file")
    findings = [err] if err else check_anchors(anchors, now, anchor_path)
    if issuer_path is None:
        return findings, None
    issuers, err = _load(issuer_path, "issuer certificate file")
    if err or not issuers:
        return findings + [err or Finding("error", "source", issuer_path, "", "the issuer file holds no certificate", issuer_path)], None
    key = None
    if issuer_key_path is not None and os.path.exists(issuer_key_path):
        try:
            with open(issuer_key_path, "rb") as f:
                key = serialization.load_pem_private_key(f.read(), password=None)
        except (OSError, ValueError, TypeError) as exc:
            return findings + [Finding("error", "source", issuer_key_path, "", f"the issuer key cannot be read: {exc}", issuer_key_path)], None
    findings.append(check_issuer(issuers[0], anchors, now, key, issuer_path))
    return findings, issuers[0].subject.rfc4514_string()


def check_ca_dir(directory: str, now: float) -> tuple[list[Finding], str | None]:
    from nodemesh.controller.ca import ANCHOR_FILE, ISSUER_FILE, ISSUER_KEY_FILE

    return check_files(os.path.join(directory, ANCHOR_FILE), os.path.join(directory, ISSUER_FILE), now,
                       os.path.join(directory, ISSUER_KEY_FILE))


def to_json(findings: Sequence[Finding]) -> dict[str, Any]:
    return {"status": worst(findings), "exit_code": exit_code(findings), "thresholds": {
        "trust_anchor_warn_days": ANCHOR_WARN / 86400, "issuer_warn_days": ISSUER_WARN / 86400, "leaf_renew_fraction": RENEW_FRACTION},
        "checks": [asdict(f) for f in findings]}
