"""What must not be printed: secrets masked in settings, URIs and messages. Pure; no I/O.

A tracking URI may carry a password (``http://user:pw@mlflow``, ``postgresql://user:pw@db/mlflow``) and
Kafka client options carry SASL and TLS passwords. Settings printed by ``anomaly config show`` go through
``redacted``; every message that may quote a URI (this package's errors, the worker's health detail, the
log lines and the banner naming the store) goes through ``masked``.
"""

from __future__ import annotations

import re
from typing import Any

MASK = "***"
_SECRET_KEY = ("password", "secret", "token", "credential", "apikey", "passphrase")
# user:password@host: the password runs to the LAST @ of the word (one may hold @, and SQLAlchemy takes a /
# in it too); a path holding an @ is masked with it, which a message can afford. An empty user too.
_USERINFO = re.compile(r"(?<=://)([^/:@\s'\"]*):[^\s'\"]*@")
# ?password= / sslpassword= / &token= / &sig= (a signed URL's signature) and key=value strings (libpq's),
# a quoted value whole ('my secret')
_PARAMETER = re.compile(r"(?i)((?:^|[?&;\s])[\w-]*(?:password|passwd|secret|token|sig|signature|api_?key)\s*=\s*)"
                        r"('[^']*'|\"[^\"]*\"|[^&;\s'\"]*)")


def secret_key(key: Any) -> bool:
    """Whether a settings key names a secret: a password, secret, token or credential, or a key
    (``api_key``, ``private_key``, ``ssl_key``: a name that is or ends in ``key``)."""
    if not isinstance(key, str):
        return False
    k = key.lower()
    return any(word in k for word in _SECRET_KEY) or k == "key" or k.endswith(("_key", "-key"))


def masked(text: str) -> str:
    """``text`` with the password of every URI's user info (``postgresql://user:***@db``) and the value of
    every password, token or signature parameter masked."""
    if "=" not in text and "@" not in text:  # nothing to mask: the usual message
        return text
    return _PARAMETER.sub(rf"\1{MASK}", _USERINFO.sub(rf"\1:{MASK}@", text))


def redacted(doc: Any) -> Any:
    """``doc`` (settings as plain data) with secrets masked, for printing: values of keys that name a
    secret (``kafka.client_options.sasl_plain_password``), and in strings what ``masked`` masks."""
    if isinstance(doc, dict):
        return {k: MASK if secret_key(k) and v else redacted(v) for k, v in doc.items()}
    if isinstance(doc, list):
        return [redacted(v) for v in doc]
    if isinstance(doc, str):
        return masked(doc)
    return doc
