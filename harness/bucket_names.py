"""Cloud Storage's bucket naming rules (cloud.google.com/storage/docs/buckets#naming), in one place: the
checkpoint store checks a gs:// URL with them (harness/checkpoint/gcs_store.py) and infra validates its bucket
names with them (infra/settings.py), so neither accepts a name the other, or GCS, rejects. No imports
beyond `re`: infra's synthesis reads it without loading the runtime."""

from __future__ import annotations

import re

_CHARS = re.compile(r"[a-z0-9][a-z0-9._-]*[a-z0-9]")
_IP = re.compile(r"\d{1,3}(\.\d{1,3}){3}")
_GOOGLE = re.compile(r"g[o0]{2}gle")  # "google" and close misspellings


def bucket_name_problem(name: str) -> str | None:
    """Why GCS would reject this bucket name, or None."""
    if not name:
        return "no bucket name"
    parts = name.split(".")
    if not (3 <= len(name) <= (222 if len(parts) > 1 else 63)) or any(len(p) > 63 for p in parts):
        return "3-63 characters (up to 222 with dots, at most 63 between dots)"
    if not _CHARS.fullmatch(name):
        return "only lowercase letters, digits, '-', '_' and '.', starting and ending with a letter or digit"
    if ".." in name or ".-" in name or "-." in name:
        return "no '..', '.-' or '-.'"
    if _IP.fullmatch(name):
        return "not an IP address"
    if name.startswith("goog") or _GOOGLE.search(name):
        return "must not start with 'goog' or contain 'google' (or close misspellings)"
    return None
