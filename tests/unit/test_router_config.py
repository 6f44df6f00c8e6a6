"""servers.toml loading: the original mvllm format unchanged, the new keys, errors naming file+key."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from mvllm.common.tomlconf import ConfigError
from mvllm.router.config import find_config, load_config
from mvllm.router.policy import cache_params
from mvllm.router.prefix_index import RSS_PER_BYTE, CacheAwareParams

# The README of the original mvllm, as users have it.
SEED_README = """
[servers]
servers = [
    { url = "http://gpu-server-1:8081", max_concurrent_requests = 3 },
    { url = "http://gpu-server-2:8088", max_concurrent_requests = 5 },
    { url = "http://gpu-server-3:8089", max_concurrent_requests = 4 },
]

[config]
health_check_interval = 10
request_timeout = 120
max_retries = 3
"""

# The original servers.example.toml, with every [config] key it had.
SEED_EXAMPLE = """
[servers]
servers = [
    { url = "http://localhost:8801", max_concurrent_requests = 10 },
    { url = "http://localhost:8802", max_concurrent_requests = 3 },
]

[config]
health_check_interval = 10
config_reload_interval = 30
request_timeout = 30
health_check_timeout = 5
max_retries = 3
failure_threshold = 2
auto_recovery_threshold = 60

enable_active_health_check = true
health_check_max_response_time = 10.0
health_check_min_success_rate = 0.8
health_check_window_size = 10
health_check_consecutive_failures = 3
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "servers.toml"
    p.write_text(text)
    return p


def test_seed_readme_format_loads(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, SEED_README))
    assert [n.url for n in cfg.nodes] == ["http://gpu-server-1:8081", "http://gpu-server-2:8088", "http://gpu-server-3:8089"]
    assert [n.capacity for n in cfg.nodes] == [3, 5, 4]
    assert [n.name for n in cfg.nodes] == ["gpu-server-1:8081", "gpu-server-2:8088", "gpu-server-3:8089"]
    assert cfg.health.interval == 10
    assert cfg.timeouts.total == 120
    assert cfg.timeouts.first_byte == 120  # defaults to request_timeout
    assert cfg.retry.max_retries == 3
    assert cfg.port == 8888


def test_seed_example_with_all_old_keys_loads(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, SEED_EXAMPLE))
    assert len(cfg.nodes) == 2
    assert cfg.breaker.failure_threshold == 2
    assert cfg.breaker.cooldown == 60  # auto_recovery_threshold
    assert cfg.health.timeout == 5
    assert cfg.health.failures_to_down == 3
    assert cfg.health.enabled is True


def test_new_keys(tmp_path: Path) -> None:
    cfg = load_config(
        write(
            tmp_path,
            """
[router]
host = "0.0.0.0"
port = 9000
max_body_bytes = 4096

[policy]
type = "round-robin"

[config]
scrape_interval = 0.5
scrape_timeout = 0.2
connect_timeout = 1.5
first_byte_timeout = 20
request_timeout = 60
breaker_cooldown = 3
breaker_success_threshold = 2
retry_backoff_base = 0.01
retry_backoff_max = 0.1
default_max_concurrent_requests = 64

[[servers.servers]]
name = "a"
url = "http://10.0.0.1:8000/"
models = ["llama", "qwen"]
weight = 2.0

[[servers.servers]]
url = "https://10.0.0.2:8000"
drain = true
""",
        )
    )
    assert (cfg.host, cfg.port, cfg.max_body_bytes) == ("0.0.0.0", 9000, 4096)
    assert cfg.policy.type == "round-robin"
    assert cfg.scrape.interval == 0.5 and cfg.scrape.timeout == 0.2
    assert (cfg.timeouts.connect, cfg.timeouts.first_byte, cfg.timeouts.total) == (1.5, 20, 60)
    assert (cfg.breaker.cooldown, cfg.breaker.success_threshold) == (3, 2)
    assert (cfg.retry.backoff_base, cfg.retry.backoff_max) == (0.01, 0.1)
    a, b = cfg.nodes
    assert (a.name, a.url, a.models, a.weight, a.capacity) == ("a", "http://10.0.0.1:8000", ("llama", "qwen"), 2.0, None)
    assert (b.name, b.drain, b.url) == ("10.0.0.2:8000", True, "https://10.0.0.2:8000")
    assert cfg.default_capacity == 64


@pytest.mark.parametrize(
    ("text", "key", "words"),
    [
        ('[servers]\nservers = [{ url = "ftp://x:1" }]', "servers.servers[0].url", "http://"),
        ('[servers]\nservers = [{ url = "http://x:1/v1" }]', "servers.servers[0].url", "without /v1"),
        ('[servers]\nservers = [{ max_concurrent_requests = 3 }]', "servers.servers[0].url", "required"),
        ('[servers]\nservers = [{ url = "http://x:1", max_concurrent_requests = "3" }]',
         "servers.servers[0].max_concurrent_requests", "integer"),
        ('[servers]\nservers = [{ url = "http://x:1", max_concurrent_requests = 0 }]',
         "servers.servers[0].max_concurrent_requests", ">= 1"),
        ('[servers]\nservers = [{ url = "http://x:1", wieght = 2 }]', "servers.servers[0].wieght", "unknown key"),
        ('[servers]\nservers = [{ url = "http://x:1", weight = 0 }]', "servers.servers[0].weight", "> 0"),
        ('[servers]\nservers = [{ url = "http://x:1" }, { url = "http://x:1" }]', "servers.servers[1].name", "duplicate"),
        ('[servers]\nservers = [{ url = "http://x:1", name = "a" }, { url = "http://y:1", name = "a" }]',
         "servers.servers[1].name", "duplicate"),
        ('[servers]\nservers = "http://x:1"', "servers.servers", "list"),
        ("[config]\nmax_retries = -1", "config.max_retries", ">= 0"),
        ("[config]\nhealth_check_interval = \"10s\"", "config.health_check_interval", "number"),
        ("[config]\nrequest_timeout = 10\nfirst_byte_timeout = 20", "config.first_byte_timeout", "request_timeout"),
        ("[config]\nbreaker_cooldown = 1\nauto_recovery_threshold = 2", "config.auto_recovery_threshold", "not both"),
        ('[config]\nresume_streams = "yes"', "config.resume_streams", "true or false"),
        ('[policy]\ntype = "fastest"', "policy.type", "least-score"),
        ('[policy]\ntype = "fastest"', "policy.type", "cache-aware"),
        ("[policy]\ncache_threshold = 1.5", "policy.cache_threshold", "<= 1.0"),
        ("[policy]\ncache_threshold = -0.1", "policy.cache_threshold", ">= 0.0"),
        ("[policy]\nbalance_abs_threshold = -1", "policy.balance_abs_threshold", ">= 0.0"),
        ("[policy]\nbalance_rel_threshold = 0.5", "policy.balance_rel_threshold", ">= 1.0"),
        ("[policy]\nkv_full_threshold = 0", "policy.kv_full_threshold", ">= 0.01"),
        ("[policy]\nkv_full_threshold = 90", "policy.kv_full_threshold", "<= 1.0"),
        ("[policy]\nmax_tree_bytes = 1000", "policy.max_tree_bytes", ">= 1048576"),
        ('[policy]\nmax_tree_bytes = "32MiB"', "policy.max_tree_bytes", "integer"),
        ("[policy]\nmax_tree_bytes = 33554432.0", "policy.max_tree_bytes", "integer"),
        ("[policy]\nmax_prefix_chars = 10", "policy.max_prefix_chars", ">= 64"),
        ("[policy]\nentry_ttl = 0", "policy.entry_ttl", ">= 1.0"),
        ("[policy]\ncache_treshold = 0.5", "policy.cache_treshold", "unknown key"),
        ("[router]\nport = 70000", "router.port", "<= 65535"),
        ("[routr]\nport = 1", "routr", "unknown key"),
        ('[[agents]]\nurl = "http://x:1"\nwieght = 2', "agents[0].wieght", "unknown key"),
    ],
)
def test_errors_name_file_key_and_expectation(tmp_path: Path, text: str, key: str, words: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    msg = str(info.value)
    assert str(path) in msg
    assert f"key '{key}'" in msg
    assert words in msg


def test_cache_aware_policy_keys(tmp_path: Path) -> None:
    path = write(tmp_path, """
[policy]
type = "cache-aware"
cache_threshold = 0.7
balance_abs_threshold = 0.5
balance_rel_threshold = 2
kv_full_threshold = 0.95
max_tree_bytes = 8388608
max_prefix_chars = 8192
entry_ttl = 120
""")
    pol = load_config(path).policy
    assert pol.type == "cache-aware"
    assert (pol.cache_threshold, pol.balance_abs_threshold, pol.balance_rel_threshold) == (0.7, 0.5, 2.0)
    assert (pol.kv_full_threshold, pol.max_tree_bytes, pol.max_prefix_chars, pol.entry_ttl) == (0.95, 8388608, 8192, 120.0)
    params = cache_params(pol)
    # max_tree_bytes bounds the router's RSS growth: the index's own byte count gets that / RSS_PER_BYTE.
    assert (params.kv_full, params.max_tree_bytes, params.cache_threshold) == (0.95, int(8388608 / RSS_PER_BYTE), 0.7)
    # The other defaults are the policy module's own.
    default = cache_params(load_config(write(tmp_path, '[policy]\ntype = "cache-aware"')).policy)
    assert default == replace(CacheAwareParams(), max_tree_bytes=int(CacheAwareParams().max_tree_bytes / RSS_PER_BYTE))


def test_invalid_toml_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(write(tmp_path, "[servers\n"))
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "nope.toml")


def test_empty_file_is_a_router_with_no_nodes(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, ""))
    assert cfg.nodes == ()


def test_lookup_order(tmp_path: Path) -> None:
    cwd = tmp_path / "cwd"
    home = tmp_path / "home"
    cwd.mkdir()
    (home / ".config" / "mvllm").mkdir(parents=True)
    assert find_config(None, cwd=cwd, home=home) is None  # nothing: the demo
    user = home / ".config" / "mvllm" / "servers.toml"
    user.write_text("")
    assert find_config(None, cwd=cwd, home=home) == user
    local = cwd / "servers.toml"
    local.write_text("")
    assert find_config(None, cwd=cwd, home=home) == local
    explicit = tmp_path / "other.toml"
    assert find_config(str(explicit), cwd=cwd, home=home) == explicit


def test_the_shipped_example_loads() -> None:
    example = Path(__file__).resolve().parents[2] / "servers.example.toml"
    cfg = load_config(example)
    assert [n.name for n in cfg.nodes] == ["gpu-server-1:8000", "gpu-2", "gpu-3"]
    assert cfg.nodes[2].models == ("Qwen/Qwen3-8B",)
    assert cfg.breaker.cooldown == 10


def test_resume_streams_is_on_unless_turned_off(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, SEED_README)).resume_streams is True
    assert load_config(write(tmp_path, "[config]\nresume_streams = false")).resume_streams is False
