"""API keys: the key model, a store that finds a presented token by its SHA-256, and the pure
`authorize` decision (which paths need a key, which role, which models) the middleware applies."""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import posixpath
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Literal

from multidict import CIMultiDict, CIMultiDictProxy

from mvllm.router.access.limits import LimitSpec, QuotaSpec

Role = Literal["user", "admin"]
ROLES: tuple[Role, ...] = ("user", "admin")

# Paths that never need a key (load balancers and orchestrators probe them without credentials).
OPEN_PATHS = frozenset({"/health", "/ready"})
# Paths open unless `[auth] protect_metrics = true`; then any valid key may read them.
METRICS_PATHS = frozenset({"/metrics", "/load-stats"})

# Shown instead of a key: "sk-ab…" for a key configured in plaintext, the hash's start otherwise.
HINT_CHARS = 5


def hash_key(token: str) -> bytes:
    """SHA-256 of a key as the store keeps it (32 bytes). Keys are printable ASCII (the loader checks)."""
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()


def key_hint(plaintext: str) -> str:
    return plaintext[:HINT_CHARS] + "…"


def digest_hint(digest: bytes) -> str:
    return "sha256:" + digest.hex()[:8] + "…"


@dataclass(frozen=True, repr=False)
class ApiKey:
    """One configured key. Holds the SHA-256 of the secret, never the secret itself."""

    name: str
    digest: bytes  # sha256(key), 32 bytes
    hint: str  # "sk-ab…" or "sha256:1a2b3c4d…": what logs and screens may show
    enabled: bool = True
    role: Role = "user"
    models: tuple[str, ...] = ("*",)  # fnmatch globs, case-sensitive; () allows no model
    limits: LimitSpec | None = None
    quota: QuotaSpec | None = None

    def __post_init__(self) -> None:
        if len(self.digest) != 32:
            raise ValueError("digest must be the 32-byte SHA-256 of the key")
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {self.role!r}")

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    def allows_model(self, model: str) -> bool:
        # fnmatchcase: "Llama*" must not match "llama-3", since served model names are case-sensitive.
        if self.models == ("*",):
            return True
        return any(fnmatch.fnmatchcase(model, pattern) for pattern in self.models)

    def __repr__(self) -> str:
        return (
            f"ApiKey(name={self.name!r}, key={self.hint!r}, role={self.role!r}, enabled={self.enabled}, "
            f"models={self.models!r}, limits={self.limits!r}, quota={self.quota!r})"
        )

    __str__ = __repr__


class KeyStore:
    """The configured keys, found by the SHA-256 of a presented token; empty = auth is open."""

    def __init__(self, keys: Iterable[ApiKey] = (), *, protect_metrics: bool = False) -> None:
        self.keys: tuple[ApiKey, ...] = tuple(keys)
        self.protect_metrics = protect_metrics
        self._by_digest: dict[bytes, ApiKey] = {}
        self._by_name: dict[str, ApiKey] = {}
        for key in self.keys:
            # The config loader reports these with file and line; this guards other callers.
            if key.name in self._by_name:
                raise ValueError(f"two keys named {key.name!r}")
            if key.digest in self._by_digest:
                raise ValueError(f"keys {self._by_digest[key.digest].name!r} and {key.name!r} are the same key")
            self._by_name[key.name] = key
            self._by_digest[key.digest] = key

    @property
    def open(self) -> bool:
        return not self.keys

    def __len__(self) -> int:
        return len(self.keys)

    def __iter__(self) -> Iterator[ApiKey]:
        return iter(self.keys)

    def by_name(self, name: str) -> ApiKey | None:
        return self._by_name.get(name)

    def lookup(self, token: str) -> ApiKey | None:
        """The key whose secret is `token`, enabled or not; None if there is none.

        Why this is safe against timing attacks although dict lookups and `bytes ==` stop at the
        first differing byte: what gets compared is SHA-256(token), never the token. An attacker
        who measures how long a lookup takes learns at best how many leading bytes of the digest
        of their guess match a stored digest, and choosing guesses whose digest shares more leading
        bytes with a stored one is a preimage search on SHA-256, which tells them nothing about the
        key. (The dict's slot is picked by Python's per-process salted hash of the digest, so even
        that leak is noise.) compare_digest then confirms the match in constant time, so the check
        stays sound if this lookup ever becomes a scan or a prefix index.
        """
        if not token.isascii():  # keys are ASCII (the loader checks): nothing else can match
            return None
        digest = hash_key(token)
        key = self._by_digest.get(digest)
        if key is None or not hmac.compare_digest(key.digest, digest):
            return None
        return key

    def __repr__(self) -> str:
        return f"KeyStore({len(self.keys)} keys: {', '.join(k.name for k in self.keys)}; protect_metrics={self.protect_metrics})"


# --------------------------------------------------------------------------------------------------
# Reading the token from a request's headers.


def _header(headers: Mapping[str, str], name: str) -> str | None:
    value = headers.get(name)
    if value is None and not isinstance(headers, (CIMultiDict, CIMultiDictProxy)):
        lname = name.lower()
        for k, v in headers.items():
            if k.lower() == lname:
                return v
    return value


def extract_token(headers: Mapping[str, str]) -> str | None:
    """The API key a request presents, or None.

    `Authorization: Bearer KEY` (scheme case-insensitive), the bare `Authorization: KEY` that the
    tools we replace accept, or `x-api-key: KEY` (Anthropic-style clients). Authorization wins when
    both are sent. Any other scheme (`Basic ...`) is returned whole and so matches no key.
    """
    value = _header(headers, "authorization")
    if value is not None:
        value = value.strip()
        scheme, sep, rest = value.partition(" ")
        if sep and scheme.lower() == "bearer":
            value = rest.strip()
        elif not sep and value.lower() == "bearer":
            value = ""
        if value:
            return value
    value = _header(headers, "x-api-key")
    if value is not None:
        value = value.strip()
        if value:
            return value
    return None


# --------------------------------------------------------------------------------------------------
# The decision.


@dataclass(frozen=True)
class Decision:
    """Allow (with the key; None when no key was needed) or deny with an OpenAI-form status/message."""

    allowed: bool
    key: ApiKey | None = None
    status: int = 200
    message: str = ""
    code: str | None = None

    @property
    def headers(self) -> dict[str, str]:
        # RFC 9110 asks a 401 to name the scheme it wants.
        return {"WWW-Authenticate": 'Bearer realm="mvllm"'} if self.status == 401 else {}


_OPEN = Decision(True)


def _deny(status: int, message: str, code: str) -> Decision:
    return Decision(False, status=status, message=message, code=code)


def is_admin_path(path: str) -> bool:
    """`/admin` and below, and `/proxy/` and below (an instance's engine paths: admin keys only),
    also when spelt `//admin/x`, `/x/../admin`, `/Admin/x`.

    Normalising here can only make more paths admin-only, never open one, so it is safe whatever
    the router's own path matching does.
    """
    lowered = path.lower()
    if "admin" not in lowered and "proxy" not in lowered:  # the common case, without normpath's cost
        return False
    norm = posixpath.normpath("/" + lowered.lstrip("/"))
    return norm in ("/admin", "/proxy") or norm.startswith(("/admin/", "/proxy/"))


def check_model(key: ApiKey | None, model: str | None) -> Decision:
    """403 if `key` may not use `model`; allowed when there is no key (open auth) or no model."""
    if key is None or model is None or key.allows_model(model):
        return Decision(True, key=key)
    return _deny(403, f"API key '{key.name}' is not allowed to use model '{model}'.", "model_not_allowed")


def authorize(store: KeyStore, headers: Mapping[str, str], path: str, model: str | None = None) -> Decision:
    """Who may call `path` (and `model`, when known) with these headers. Pure.

    Order: `/health` open; no keys configured = open; `/metrics`, `/load-stats` open unless
    `protect_metrics`; then a key is needed (401 missing / unknown / disabled), `/admin/*` needs
    the admin role (403) and `model` must match the key's allow-list (403). The middleware calls
    this before reading the body with `model=None`, then `check_model` once the body gave a model.
    """
    if path in OPEN_PATHS or store.open:
        return _OPEN
    if path in METRICS_PATHS and not store.protect_metrics:
        return _OPEN
    token = extract_token(headers)
    if token is None:
        return _deny(
            401,
            "Missing API key: send it as 'Authorization: Bearer YOUR_KEY' (or in the 'x-api-key' header).",
            "missing_api_key",
        )
    key = store.lookup(token)
    if key is None:
        # The presented token is not echoed, not even a prefix: error bodies end up in logs.
        return _deny(401, "Incorrect API key provided.", "invalid_api_key")
    if not key.enabled:
        return _deny(401, f"API key '{key.name}' is disabled.", "api_key_disabled")
    if is_admin_path(path) and not key.is_admin:
        return _deny(
            403, f"API key '{key.name}' has role '{key.role}'; the admin API needs an admin key.", "admin_required"
        )
    return check_model(key, model)
