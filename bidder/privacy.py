"""Privacy signals: may this request's personal data be used?

The policy (docs/conformance.md): personal data (the user key, the IP address, the city, the ``usertag``
segments) feeds the model and the per-user frequency caps only when no signal says otherwise. It is withheld
when, in this order:

- ``regs.coppa`` = 1 (the audience is children): ``coppa``;
- GDPR applies (``regs.gdpr`` = 1, or ``regs.ext.gdpr``, or GPP section 2 in ``regs.gpp_sid``) and the TCF v2
  consent string (``user.consent``, or ``user.ext.consent``) does not grant purposes 1 (store and access
  information on a device), 3 (create a personalised ads profile) and 4 (select personalised ads):
  ``gdpr_no_consent``, or ``gdpr_bad_consent`` when the string is missing or cannot be decoded;
- the CCPA string (``regs.us_privacy``, or ``regs.ext.us_privacy``) says the user opted out of sale (third
  character ``Y``) or cannot be read: ``us_privacy_opt_out``;
- ``regs.gpp_sid`` names a GPP section other than 2 (TCF EU) and 6 (US Privacy, read from ``us_privacy``):
  the bidder does not decode the US state sections, so it assumes the opt-out: ``gpp_section``.

A request that passes with a signal counts ``gdpr_consent`` or ``us_privacy_ok``; one without any signal counts
nothing and costs one attribute test. No maintained, light Python library decodes TCF v2 (the PyPI ones are TCF
v1 or unmaintained), so the core string's purpose consents are read here, per the TCF v2 specification: the
string is base64url; its core segment starts with Version (6 bits, = 2), Created, LastUpdated (36 each), CmpId,
CmpVersion (12 each), ConsentScreen (6), ConsentLanguage (12), VendorListVersion (12), TcfPolicyVersion (6),
IsServiceSpecific, UseNonStandardTexts (1 each), SpecialFeatureOptIns (12), then PurposesConsent (24 bits,
purpose 1 first) at bit 152.
"""
from __future__ import annotations

import base64
import binascii
from functools import lru_cache

__all__ = ["PERSONAL_FIELDS", "PRIVACY_CASES", "REQUIRED_PURPOSES", "PrivacyMemory", "personal_data", "tcf_purposes",
           "withhold"]

#: how a request's privacy signals were read (``bidder_privacy_total{case}``)
PRIVACY_CASES = ("coppa", "gdpr_consent", "gdpr_no_consent", "gdpr_bad_consent", "us_privacy_ok",
                 "us_privacy_opt_out", "gpp_section")
#: TCF purposes personalised advertising needs: 1 store/access, 3 create a profile, 4 select ads by it
REQUIRED_PURPOSES = (1, 3, 4)
GPP_TCF_EU, GPP_US_PRIVACY = 2, 6
#: the raw record's personal fields and what they become without consent (the region stays: it is coarse)
PERSONAL_FIELDS = {"IP": None, "city": None, "usertag": ()}
_PURPOSES_AT, _PURPOSES_BITS, _TCF_VERSION = 152, 24, 2
_CORE_CHARS = 32  # base64 characters holding the first 192 bits (a multiple of 4: whole bytes)
_REQUIRED_BITS = sum(1 << (_PURPOSES_BITS - p) for p in REQUIRED_PURPOSES)


def tcf_purposes(consent: object) -> frozenset[int] | None:
    """The purposes a TCF v2 consent string consents to, or None when it is no TCF v2 string."""
    bits = _purpose_bits(consent) if isinstance(consent, str) else None
    if bits is None:
        return None
    return frozenset(p for p in range(1, _PURPOSES_BITS + 1) if bits >> (_PURPOSES_BITS - p) & 1)


@lru_cache(maxsize=4096)  # a user's string comes back with each of their requests
def _purpose_bits(consent: str) -> int | None:
    """The core string's 24 purpose consent bits (purpose 1 the highest), or None when it is no TCF v2 string."""
    core = consent.partition(".")[0][:_CORE_CHARS]  # the purposes end within the first 30 characters
    try:
        raw = base64.urlsafe_b64decode(core + "=" * (-len(core) % 4))
    except (binascii.Error, ValueError):
        return None
    n = len(raw) * 8
    if n < _PURPOSES_AT + _PURPOSES_BITS:
        return None
    bits = int.from_bytes(raw, "big")
    if bits >> (n - 6) != _TCF_VERSION:
        return None
    return (bits >> (n - _PURPOSES_AT - _PURPOSES_BITS)) & ((1 << _PURPOSES_BITS) - 1)


def _one(value: object) -> bool:
    return value == 1 and value is not True or value == "1"


def _ints(value: object) -> list[int]:
    if not isinstance(value, list):
        return []
    return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]


def _consent(user) -> object:
    if user is None:
        return None
    return user.consent if user.consent is not None else (user.ext.consent if user.ext is not None else None)


def personal_data(request) -> tuple[bool, str | None]:
    """(whether the request's personal data may be used, the case that decided it: one of ``PRIVACY_CASES``, or
    None without any signal)."""
    regs = request.regs
    if regs is None:
        return True, None
    return _decide(regs, _consent(request.user))


#: decisions a ``PrivacyMemory`` holds; past this many it starts again
REMEMBERED = 4096


class PrivacyMemory:
    """``personal_data``, remembered by the request's ``regs`` and consent string: an exchange's signals and a
    user's string come back with each of their requests. One per engine (its catalog's life), never shared
    between tests or processes."""

    def __init__(self, size: int = REMEMBERED):
        self.size = size
        self._decided: dict[tuple, tuple[bool, str | None]] = {}

    def personal_data(self, request) -> tuple[bool, str | None]:
        regs = request.regs
        if regs is None:
            return True, None
        consent = _consent(request.user)
        ext = regs.ext
        # a boolean flag is no OpenRTB flag, but True == 1 as keys: such regs are decided afresh
        if (regs.gdpr.__class__ is bool or regs.coppa.__class__ is bool
                or (ext is not None and ext.gdpr.__class__ is bool)):
            return _decide(regs, consent)
        key = (regs, consent)
        decided = self._decided
        try:
            found = decided.get(key)
        except TypeError:  # a list (``gpp_sid``) or an object among the signals: not remembered
            return _decide(regs, consent)
        if found is None:
            if len(decided) >= self.size:
                decided.clear()
            found = decided[key] = _decide(regs, consent)
        return found


def _decide(regs, consent: object) -> tuple[bool, str | None]:
    ext = regs.ext
    if regs.coppa is not None and _one(regs.coppa):
        return False, "coppa"
    sections = _ints(regs.gpp_sid) if regs.gpp_sid is not None else ()
    case = None
    if _one(regs.gdpr) or (ext is not None and _one(ext.gdpr)) or (sections and GPP_TCF_EU in sections):
        bits = _purpose_bits(consent) if isinstance(consent, str) else None
        if bits is None:
            return False, "gdpr_bad_consent"
        if bits & _REQUIRED_BITS != _REQUIRED_BITS:
            return False, "gdpr_no_consent"
        case = "gdpr_consent"
    us_privacy = regs.us_privacy if regs.us_privacy is not None else (ext.us_privacy if ext is not None else None)
    if us_privacy is not None or GPP_US_PRIVACY in sections:
        if not (isinstance(us_privacy, str) and len(us_privacy) == 4 and us_privacy[0] == "1"
                and us_privacy[2] in "N-"):
            return False, "us_privacy_opt_out"
        case = "us_privacy_ok"
    if sections and any(s > 0 and s not in (GPP_TCF_EU, GPP_US_PRIVACY) for s in sections):
        return False, "gpp_section"
    return True, case


def withhold(shared: dict) -> None:
    """Blank the personal fields of a request's shared raw record, before any imp record is built from it."""
    for name, blank in PERSONAL_FIELDS.items():
        shared[name] = list(blank) if isinstance(blank, tuple) else blank
