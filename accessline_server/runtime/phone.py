"""Normalisation of the numbers Accessline handles: access numbers, dialled numbers
(DNIS) and callers' numbers (ANI), as E.164 with `phonenumbers`, or SIP URIs.

A SIP URI whose user part is a phone number (`sip:+33478000001@gw;user=phone`) becomes
that number in E.164, so a switch reporting calls as SIP URIs still matches pools of
E.164 numbers. Other SIP URIs are kept as `sip:user@host` with the host in lower case.
"""

from __future__ import annotations

import re

import phonenumbers

MAX_NUMBER_LENGTH = 256

_SIP = re.compile(r"^(sips?):([^@;?\s]+)@([A-Za-z0-9.\-\[\]:]+)(?:[;?].*)?$", re.IGNORECASE)
_REGION = re.compile(r"^[A-Z]{2}$")
_TEL_PREFIX = "tel:"


class NumberFormatError(ValueError):
    """The text is not a phone number or SIP URI; the message says why."""


def valid_region(region: str) -> bool:
    return region == "" or bool(_REGION.match(region))


def _e164(raw: str, region: str) -> str:
    try:
        parsed = phonenumbers.parse(raw, region or None)
    except phonenumbers.NumberParseException as exc:
        raise NumberFormatError(
            "not a phone number" + ("" if region else " (use +<country code> or give a region)")
        ) from exc
    if not phonenumbers.is_valid_number(parsed):
        raise NumberFormatError("not a valid phone number")
    return phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164)


def normalize_number(raw: str, region: str = "") -> str:
    """The canonical form of an access number or DNIS, or NumberFormatError."""
    text = raw.strip()
    if not text:
        raise NumberFormatError("must not be empty")
    if len(text) > MAX_NUMBER_LENGTH:
        raise NumberFormatError(f"longer than {MAX_NUMBER_LENGTH} characters")
    if not valid_region(region):
        raise NumberFormatError(f"unknown region {region!r}")
    if text.lower().startswith(_TEL_PREFIX):
        return _e164(text[len(_TEL_PREFIX) :].split(";", 1)[0], region)
    sip = _SIP.match(text)
    if sip:
        scheme, user, host = sip.group(1).lower(), sip.group(2), sip.group(3).lower()
        if re.fullmatch(r"\+?[0-9\-. ()]{4,}", user):
            try:
                return _e164(user, region)
            except NumberFormatError:
                pass
        return f"{scheme}:{user}@{host}"
    if text.lower().startswith(("sip:", "sips:")):
        raise NumberFormatError("not a SIP URI of the form sip:user@host")
    return _e164(text, region)


def display_number(number: str) -> str:
    """How to show a number to a person in its own country (SIP URIs as they are)."""
    if not number.startswith("+"):
        return number
    parsed = phonenumbers.parse(number, None)
    return phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.NATIONAL)
