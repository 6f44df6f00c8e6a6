"""API keys: lookup by hash, token extraction, the authorize decision (401 / 403 / open paths)."""

import hashlib
import hmac

import pytest
from multidict import CIMultiDict

from mvllm.common.errors import error_body
from mvllm.router.access import keys as keys_mod
from mvllm.router.access.keys import (
    ApiKey,
    KeyStore,
    authorize,
    check_model,
    extract_token,
    hash_key,
    is_admin_path,
    key_hint,
)

USER_SECRET = "sk-user-0123456789abcdefghij"
ADMIN_SECRET = "sk-admin-9876543210zyxwvutsr"
OFF_SECRET = "sk-off-aaaaaaaaaaaaaaaaaaaaa"
HINT_END = len("sk-us")  # the hint shows this many characters


def make_key(secret: str, name: str, **kw) -> ApiKey:
    return ApiKey(name=name, digest=hash_key(secret), hint=key_hint(secret), **kw)


@pytest.fixture
def store() -> KeyStore:
    return KeyStore(
        [
            make_key(USER_SECRET, "team-a", models=("llama-*", "Qwen/Qwen3-?B")),
            make_key(ADMIN_SECRET, "ops", role="admin"),
            make_key(OFF_SECRET, "gone", enabled=False),
        ]
    )


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


# --- store and lookup -----------------------------------------------------------------------------


def test_lookup_finds_exact_key_only(store):
    assert store.lookup(USER_SECRET).name == "team-a"
    assert store.lookup(ADMIN_SECRET).name == "ops"
    assert store.lookup(OFF_SECRET).name == "gone"  # found; authorize refuses it
    assert store.lookup(USER_SECRET[:-1]) is None
    assert store.lookup(USER_SECRET + "x") is None
    assert store.lookup(USER_SECRET.upper()) is None
    assert store.lookup("") is None
    assert store.lookup("sk-ü-not-ascii-0123456789") is None


def test_keys_sharing_a_long_prefix_do_not_match_each_other():
    base = "sk-shared-prefix-0123456789-"
    a, b = base + "A", base + "B"
    st = KeyStore([make_key(a, "a"), make_key(b, "b")])
    assert st.lookup(a).name == "a"
    assert st.lookup(b).name == "b"
    assert st.lookup(base) is None
    assert st.lookup(base + "C") is None


def test_lookup_confirms_with_compare_digest(store, monkeypatch):
    calls = []
    real = hmac.compare_digest

    def spy(x, y):
        calls.append((x, y))
        return real(x, y)

    monkeypatch.setattr(keys_mod.hmac, "compare_digest", spy)
    assert store.lookup(USER_SECRET).name == "team-a"
    digest = hashlib.sha256(USER_SECRET.encode()).digest()
    assert calls == [(digest, digest)]


def test_store_rejects_duplicate_names_and_secrets():
    with pytest.raises(ValueError, match="two keys named"):
        KeyStore([make_key(USER_SECRET, "x"), make_key(ADMIN_SECRET, "x")])
    with pytest.raises(ValueError, match="same key"):
        KeyStore([make_key(USER_SECRET, "x"), make_key(USER_SECRET, "y")])


def test_repr_never_shows_the_secret(store):
    for key in store:
        text = repr(key) + str(key)
        assert "sk-" in text  # the hint is there
        assert key.hint in text
    text = repr(store) + "".join(repr(k) + str(k) for k in store)
    for secret in (USER_SECRET, ADMIN_SECRET, OFF_SECRET):
        assert secret not in text
        assert secret[HINT_END:] not in text
        assert secret[:HINT_END + 1] not in text
    assert repr(store.by_name("team-a")).count("sk-us…") == 1


def test_api_key_validates_digest_and_role():
    with pytest.raises(ValueError, match="32-byte"):
        ApiKey(name="x", digest=b"short", hint="?")
    with pytest.raises(ValueError, match="role"):
        ApiKey(name="x", digest=hash_key(USER_SECRET), hint="?", role="root")


# --- model allow-lists ----------------------------------------------------------------------------


def test_glob_allow_list_is_case_sensitive(store):
    key = store.by_name("team-a")
    assert key.allows_model("llama-3-8b")
    assert key.allows_model("Qwen/Qwen3-8B")
    assert not key.allows_model("Qwen/Qwen3-14B")  # ? is one character
    assert not key.allows_model("Llama-3-8b")
    assert not key.allows_model("mistral")
    assert store.by_name("ops").allows_model("anything/at-all")
    assert not make_key(USER_SECRET, "none", models=()).allows_model("llama-3")


# --- token extraction -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "token"),
    [
        ({"Authorization": "Bearer sk-abc"}, "sk-abc"),
        ({"authorization": "bearer   sk-abc  "}, "sk-abc"),
        ({"AUTHORIZATION": "BEARER sk-abc"}, "sk-abc"),
        ({"Authorization": "sk-abc"}, "sk-abc"),  # the bare form
        ({"x-api-key": "sk-abc"}, "sk-abc"),
        ({"X-Api-Key": " sk-abc "}, "sk-abc"),
        ({"Authorization": "Bearer sk-1", "x-api-key": "sk-2"}, "sk-1"),
        ({"Authorization": "Bearer ", "x-api-key": "sk-2"}, "sk-2"),
        ({"Authorization": "Bearer"}, None),
        ({"Authorization": "   "}, None),
        ({"Authorization": "Basic dXNlcjpwYXNz"}, "Basic dXNlcjpwYXNz"),  # matches no key
        ({}, None),
        ({"Content-Type": "application/json"}, None),
    ],
)
def test_extract_token(headers, token):
    assert extract_token(headers) == token
    assert extract_token(CIMultiDict(headers)) == token


# --- authorize ------------------------------------------------------------------------------------


def test_no_keys_means_open():
    st = KeyStore()
    assert st.open
    for path in ("/v1/chat/completions", "/admin/nodes", "/metrics"):
        d = authorize(st, {}, path, "any-model")
        assert d.allowed and d.key is None


def test_health_always_open(store):
    d = authorize(store, {}, "/health", None)
    assert d.allowed and d.key is None
    assert not authorize(store, {}, "/health/", None).allowed  # only the exact path


@pytest.mark.parametrize("path", ["/metrics", "/load-stats"])
def test_metrics_open_or_keyed(path):
    keys = [make_key(USER_SECRET, "team-a")]
    assert authorize(KeyStore(keys), {}, path, None).allowed
    protected = KeyStore(keys, protect_metrics=True)
    d = authorize(protected, {}, path, None)
    assert (d.allowed, d.status) == (False, 401)
    d = authorize(protected, bearer(USER_SECRET), path, None)
    assert d.allowed and d.key.name == "team-a"


def test_missing_key_is_401(store):
    d = authorize(store, {}, "/v1/chat/completions", "llama-3")
    assert (d.allowed, d.status, d.code) == (False, 401, "missing_api_key")
    assert "Authorization: Bearer" in d.message
    assert d.headers == {"WWW-Authenticate": 'Bearer realm="mvllm"'}
    body = error_body(d.status, d.message, code=d.code)["error"]
    assert body["type"] == "authentication_error" and body["code"] == "missing_api_key"


def test_unknown_key_is_401_and_not_echoed(store):
    wrong = "sk-wrong-key-0000000000000000"
    d = authorize(store, bearer(wrong), "/v1/models", None)
    assert (d.allowed, d.status, d.code) == (False, 401, "invalid_api_key")
    assert wrong not in d.message and "sk-wr" not in d.message


def test_disabled_key_is_401(store):
    d = authorize(store, bearer(OFF_SECRET), "/v1/models", None)
    assert (d.allowed, d.status, d.code) == (False, 401, "api_key_disabled")
    assert "'gone'" in d.message


def test_admin_paths_need_admin_role(store):
    for path in ("/admin/nodes", "/admin", "//admin/reload", "/Admin/nodes", "/v1/../admin/x"):
        d = authorize(store, bearer(USER_SECRET), path, None)
        assert (d.allowed, d.status, d.code) == (False, 403, "admin_required"), path
        assert "'team-a'" in d.message
        d = authorize(store, bearer(ADMIN_SECRET), path, None)
        assert d.allowed and d.key.name == "ops"
    assert not is_admin_path("/administrator")
    assert not is_admin_path("/v1/admin")


def test_instance_proxy_paths_need_admin_role(store):
    for path in ("/proxy/ra/health", "//proxy/ra/metrics", "/Proxy/ra/v1/models", "/v1/../proxy/x/health"):
        d = authorize(store, bearer(USER_SECRET), path, None)
        assert (d.allowed, d.status, d.code) == (False, 403, "admin_required"), path
        assert authorize(store, bearer(ADMIN_SECRET), path, None).allowed
    assert not is_admin_path("/proxyish/x")
    assert not is_admin_path("/v1/proxy/x")


def test_model_outside_allow_list_is_403(store):
    d = authorize(store, bearer(USER_SECRET), "/v1/chat/completions", "mistral-7b")
    assert (d.allowed, d.status, d.code) == (False, 403, "model_not_allowed")
    assert "'mistral-7b'" in d.message and "'team-a'" in d.message
    body = error_body(d.status, d.message, code=d.code)["error"]
    assert body["type"] == "permission_error"
    d = authorize(store, {"x-api-key": USER_SECRET}, "/v1/chat/completions", "llama-3-8b")
    assert d.allowed and d.key.name == "team-a"
    assert d.headers == {}


def test_two_step_check_before_and_after_body(store):
    # Before reading the body the middleware knows no model; the key alone is checked.
    d = authorize(store, {"Authorization": USER_SECRET}, "/v1/completions", None)
    assert d.allowed
    assert not check_model(d.key, "mistral-7b").allowed
    assert check_model(d.key, "llama-x").allowed
    assert check_model(None, "mistral-7b").allowed  # open auth
