"""The router's configuration: typed dataclasses and the loader of `servers.toml`.

The original mvllm format (`[servers] servers = [{url, max_concurrent_requests}]` and its `[config]`
keys) loads unchanged; new keys are documented in servers.example.toml and docs/configuration.md.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from yarl import URL

from mvllm.common.envvars import ROUTER_ENV, read_env
from mvllm.common.logfiles import LogConfig, parse_log_keys
from mvllm.common.tomlconf import ConfigError, Section, load_toml, range_problem
from mvllm.router.access.config import AuthConfig, load_auth, read_node_api_key
from mvllm.router.autoscale import AutoscaleConfig, parse_autoscale

CONFIG_NAME = "servers.toml"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8888
MIN_TREE_BYTES = 1024 * 1024
POLICY_TYPES = ("least-score", "round-robin", "cache-aware")
# What a static server runs: decides the metric names its load is read from (mvllm.router.fleet.engines).
NODE_ENGINES = ("vllm", "sglang")

# Keys of the original mvllm `[config]` table that this router accepts so that old files load as
# they are, but that have no effect: watchfiles replaces the reload poll, and the breaker replaces
# the success-rate window.
LEGACY_NO_EFFECT = ("config_reload_interval", "health_check_min_success_rate", "health_check_window_size")
# [cluster] on_redis_down: per-router limits meanwhile, or 503 for the requests a limit applies to.
ON_REDIS_DOWN = ("local", "reject")
REDIS_SCHEMES = ("redis", "rediss", "unix")
# How long a request that makes an agent load (or wake) its model may wait for the first byte.
DEFAULT_LOAD_TIMEOUT = 600.0


@dataclass(frozen=True)
class NodeConfig:
    """One node as the operator wrote it: a static server (`[servers]`, kind "static") or a node
    agent (`[[agents]]`, kind "agent", which adds `token` and `load_timeout`)."""

    name: str
    url: str
    capacity: int | None = None
    models: tuple[str, ...] | None = None
    weight: float = 1.0
    drain: bool = False
    kind: str = "static"
    # The bearer token the router sends to the node: an agent's token, or a static server's api_key
    # (a vLLM started with --api-key). Never shown (repr=False).
    token: str | None = field(default=None, repr=False)
    load_timeout: float = DEFAULT_LOAD_TIMEOUT  # agents: first-byte wait of a request that loads a model
    engine: str = "vllm"  # static servers: "vllm" or "sglang" (NODE_ENGINES)


@dataclass(frozen=True)
class HealthConfig:
    enabled: bool = True
    interval: float = 10.0
    timeout: float = 2.0
    failures_to_down: int = 2
    max_response_time: float = 10.0


@dataclass(frozen=True)
class TimeoutConfig:
    connect: float = 3.0
    first_byte: float = 300.0  # static nodes; an agent's requests wait up to its load_timeout
    total: float = 300.0
    # Once an answer has begun: the longest wait between two chunks (a node hung mid-stream).
    stream_idle: float = 60.0


@dataclass(frozen=True)
class RetryConfig:
    max_retries: int = 3
    backoff_base: float = 0.02
    backoff_max: float = 0.5


@dataclass(frozen=True)
class BreakerConfig:
    failure_threshold: int = 2
    cooldown: float = 10.0
    success_threshold: int = 1


@dataclass(frozen=True)
class ScrapeConfig:
    interval: float = 1.0
    timeout: float = 0.5
    models_interval: float = 30.0


@dataclass(frozen=True)
class PolicyConfig:
    type: str = "least-score"
    idle_threshold: float = 0.5
    waiting_weight: float = 0.5
    # cache-aware only (mvllm.router.prefix_index documents each; the defaults are its own).
    cache_threshold: float = 0.5
    balance_abs_threshold: float = 0.25
    balance_rel_threshold: float = 1.5
    kv_full_threshold: float = 0.9
    max_tree_bytes: int = 32 * 1024 * 1024
    max_prefix_chars: int = 16384
    entry_ttl: float = 600.0


@dataclass(frozen=True)
class ClusterConfig:
    """`[cluster]`: the Redis that routers share limits, keys, drains, load locks and events through
    (router/cluster.py). No `redis_url`: everything stays in this process's memory."""

    redis_url: str | None = field(default=None, repr=False)  # may hold a password
    on_redis_down: str = "local"
    key_prefix: str = "mvllm:"
    lease_ttl: float = 5.0  # a dead router's concurrency slots are free after this many seconds

    @property
    def enabled(self) -> bool:
        return self.redis_url is not None


@dataclass(frozen=True)
class RouterConfig:
    nodes: tuple[NodeConfig, ...] = ()
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    max_body_bytes: int = 32 * 1024 * 1024
    default_capacity: int = 256
    # The most choices (`n`, `best_of`) one request may ask for; more is answered 400 by the router
    # itself, before an engine spends its batch on it.
    max_n: int = 16
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    health: HealthConfig = field(default_factory=HealthConfig)
    timeouts: TimeoutConfig = field(default_factory=TimeoutConfig)
    retry: RetryConfig = field(default_factory=RetryConfig)
    breaker: BreakerConfig = field(default_factory=BreakerConfig)
    scrape: ScrapeConfig = field(default_factory=ScrapeConfig)
    # Seconds a client may stay idle on a connection (before its first request too, which bounds
    # slow or never-finished headers), take to send its body, or leave a stream unread.
    client_timeout: float = 60.0
    # A stream whose node dies after its first byte goes on from another node (docs/configuration.md).
    resume_streams: bool = True
    auth: AuthConfig = field(default_factory=AuthConfig)
    log: LogConfig = field(default_factory=LogConfig)  # [router] log_* keys (mvllm.common.logfiles)
    autoscale: AutoscaleConfig = field(default_factory=AutoscaleConfig)  # [autoscale] (mvllm.router.autoscale)
    workers: int = 1  # [router] workers: router processes on one port (needs [cluster] redis_url)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    source: Path | None = None


def find_config(explicit: str | Path | None, *, cwd: Path | None = None, home: Path | None = None) -> Path | None:
    """`--config`, else ./servers.toml, else ~/.config/mvllm/servers.toml; None means: run the demo."""
    if explicit:
        return Path(explicit)
    cwd = cwd if cwd is not None else Path.cwd()
    home = home if home is not None else Path.home()
    for candidate in (cwd / CONFIG_NAME, home / ".config" / "mvllm" / CONFIG_NAME):
        if candidate.is_file():
            return candidate
    return None


def load_config(path: str | Path, environ: Mapping[str, str] | None = None) -> RouterConfig:
    """Read and validate a servers.toml; raises ConfigError naming the file, the key and the problem.
    The MVLLM_* variables of `environ` (default: the process's) override its keys (apply_env), at
    every load, so a reload keeps them."""
    return apply_env(parse_config(load_toml(path), Path(path)), os.environ if environ is None else environ)


def apply_env(config: RouterConfig, environ: Mapping[str, str]) -> RouterConfig:
    """`config` with the keys that MVLLM_* variables set (mvllm.common.envvars.ROUTER_ENV) replaced."""
    env = read_env(ROUTER_ENV, environ)
    log = config.log
    log = replace(
        log,
        level=env.get("log_level", log.level),
        file=env.get("log_file", log.file),
        max_bytes=env.get("log_max_bytes", log.max_bytes),
        backups=env.get("log_backups", log.backups),
        retention_days=env.get("log_retention_days", log.retention_days),
    )
    cluster = config.cluster
    if "redis_url" in env:
        problem = _redis_url_problem(env["redis_url"])
        if problem:
            raise ConfigError(None, None, f"environment variable MVLLM_REDIS_URL: {problem}")
        cluster = replace(cluster, redis_url=env["redis_url"])
    return replace(
        config, host=env.get("host", config.host), port=env.get("port", config.port), log=log, cluster=cluster
    )


def _redis_url_problem(url: str) -> str | None:
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme not in REDIS_SCHEMES:
        return f"expected a redis:// (or rediss://, unix://) URL, got {_redacted(url)!r}"
    return None


def _redacted(url: str) -> str:
    head, sep, tail = url.partition("@")
    return ("***@" + tail) if sep else head


def _parse_cluster(root: Section) -> ClusterConfig:
    sec = root.section("cluster")
    url = sec.str("redis_url", None) or None
    problem = _redis_url_problem(url) if url is not None else None
    if problem:
        raise sec.error("redis_url", problem)
    cluster = ClusterConfig(
        redis_url=url,
        on_redis_down=sec.choice("on_redis_down", ClusterConfig.on_redis_down, ON_REDIS_DOWN),
        key_prefix=sec.str("key_prefix", ClusterConfig.key_prefix) or ClusterConfig.key_prefix,
        lease_ttl=sec.float("lease_ttl", ClusterConfig.lease_ttl, min=1.0, max=60.0) or ClusterConfig.lease_ttl,
    )
    sec.check_unknown()
    return cluster


def parse_config(data: Mapping[str, Any], path: Path | None = None) -> RouterConfig:
    root = Section(data, path, "")

    router = root.section("router")
    host = router.str("host", DEFAULT_HOST)
    port = router.int("port", DEFAULT_PORT, min=1, max=65535)
    max_body = router.int("max_body_bytes", RouterConfig.max_body_bytes, min=1024)
    client_timeout = router.float("client_timeout", RouterConfig.client_timeout, min=0.1)
    log = parse_log_keys(router, path.parent if path is not None else None)
    workers = router.int("workers", 1, min=1, max=256)
    router.check_unknown()
    cluster = _parse_cluster(root)
    auth = load_auth(root.raw("auth"), path if path is not None else Path(CONFIG_NAME))

    cfg = root.section("config")
    default_capacity = cfg.int("default_max_concurrent_requests", RouterConfig.default_capacity, min=1)
    request_timeout = cfg.float("request_timeout", TimeoutConfig.total, min=0.1)
    max_n = cfg.int("max_n", RouterConfig.max_n, min=1, max=16384)
    timeouts = TimeoutConfig(
        connect=cfg.float("connect_timeout", TimeoutConfig.connect, min=0.01),
        first_byte=cfg.float("first_byte_timeout", request_timeout, min=0.01),
        total=request_timeout,
        stream_idle=cfg.float("stream_idle_timeout", TimeoutConfig.stream_idle, min=0.01),
    )
    problem = range_problem(timeouts.first_byte, max=timeouts.total, max_name="request_timeout")
    if problem is not None:
        raise cfg.error("first_byte_timeout", problem)
    health = HealthConfig(
        enabled=cfg.bool("enable_active_health_check", True),
        interval=cfg.float("health_check_interval", HealthConfig.interval, min=0.05),
        timeout=cfg.float("health_check_timeout", HealthConfig.timeout, min=0.01),
        failures_to_down=cfg.int("health_check_consecutive_failures", HealthConfig.failures_to_down, min=1),
        max_response_time=cfg.float("health_check_max_response_time", HealthConfig.max_response_time, min=0.01),
    )
    retry = RetryConfig(
        max_retries=cfg.int("max_retries", RetryConfig.max_retries, min=0, max=100),
        backoff_base=cfg.float("retry_backoff_base", RetryConfig.backoff_base, min=0.0),
        backoff_max=cfg.float("retry_backoff_max", RetryConfig.backoff_max, min=0.0),
    )
    if cfg.has("breaker_cooldown") and cfg.has("auto_recovery_threshold"):
        raise cfg.error("auto_recovery_threshold", "set either breaker_cooldown or its old name, not both")
    cooldown = cfg.float("breaker_cooldown", None, min=0.0)
    if cooldown is None:
        cooldown = cfg.float("auto_recovery_threshold", BreakerConfig.cooldown, min=0.0)
    breaker = BreakerConfig(
        failure_threshold=cfg.int("failure_threshold", BreakerConfig.failure_threshold, min=1),
        cooldown=cooldown,
        success_threshold=cfg.int("breaker_success_threshold", BreakerConfig.success_threshold, min=1),
    )
    scrape = ScrapeConfig(
        interval=cfg.float("scrape_interval", ScrapeConfig.interval, min=0.05),
        timeout=cfg.float("scrape_timeout", ScrapeConfig.timeout, min=0.01),
        models_interval=cfg.float("models_refresh_interval", ScrapeConfig.models_interval, min=0.1),
    )
    resume_streams = cfg.bool("resume_streams", RouterConfig.resume_streams)
    # Original keys with no effect here (see LEGACY_NO_EFFECT): still type-checked, so typos show.
    cfg.float("health_check_min_success_rate", None, min=0.0, max=1.0)
    cfg.int("health_check_window_size", None, min=1)
    cfg.float("config_reload_interval", None, min=0)
    cfg.check_unknown()

    pol = root.section("policy")
    policy = PolicyConfig(
        type=pol.choice("type", PolicyConfig.type, POLICY_TYPES),
        idle_threshold=pol.float("idle_threshold", PolicyConfig.idle_threshold, min=0.0),
        waiting_weight=pol.float("waiting_weight", PolicyConfig.waiting_weight, min=0.0),
        cache_threshold=pol.float("cache_threshold", PolicyConfig.cache_threshold, min=0.0, max=1.0),
        balance_abs_threshold=pol.float("balance_abs_threshold", PolicyConfig.balance_abs_threshold, min=0.0),
        balance_rel_threshold=pol.float("balance_rel_threshold", PolicyConfig.balance_rel_threshold, min=1.0),
        kv_full_threshold=pol.float("kv_full_threshold", PolicyConfig.kv_full_threshold, min=0.01, max=1.0),
        # At least one prompt's chain (max_prefix_chars / 64 keys of a few hundred bytes) must fit.
        max_tree_bytes=pol.int("max_tree_bytes", PolicyConfig.max_tree_bytes, min=MIN_TREE_BYTES),
        max_prefix_chars=pol.int("max_prefix_chars", PolicyConfig.max_prefix_chars, min=64, max=1_048_576),
        entry_ttl=pol.float("entry_ttl", PolicyConfig.entry_ttl, min=1.0),
    )
    pol.check_unknown()
    autoscale = parse_autoscale(root.raw("autoscale", None), path)

    servers = root.section("servers")
    nodes = _parse_nodes(servers, path)
    servers.check_unknown()
    nodes += _parse_agents(root, path, nodes)
    if auth.agent_token:  # [auth] agent_token: the token of each agent that names none of its own
        nodes = tuple(replace(n, token=auth.agent_token) if n.kind == "agent" and n.token is None else n for n in nodes)
    root.check_unknown()

    return RouterConfig(
        nodes=nodes,
        host=host or DEFAULT_HOST,
        port=port or DEFAULT_PORT,
        max_body_bytes=max_body or RouterConfig.max_body_bytes,
        default_capacity=default_capacity or RouterConfig.default_capacity,
        max_n=max_n or RouterConfig.max_n,
        policy=policy,
        health=health,
        timeouts=timeouts,
        retry=retry,
        breaker=breaker,
        scrape=scrape,
        client_timeout=client_timeout if client_timeout is not None else RouterConfig.client_timeout,
        resume_streams=resume_streams,
        auth=auth,
        log=log,
        autoscale=autoscale,
        workers=workers or 1,
        cluster=cluster,
        source=path,
    )


def _parse_nodes(servers: Section, path: Path | None) -> tuple[NodeConfig, ...]:
    entries = servers.raw("servers", [])
    if not isinstance(entries, list):
        raise servers.error("servers", "expected a list of tables like { url = \"http://host:8000\" }")
    nodes: list[NodeConfig] = []
    names: dict[str, str] = {}
    urls: dict[str, str] = {}
    for i, entry in enumerate(entries):
        s = Section(entry, path, f"servers.servers[{i}]")
        url = _parse_url(s)
        capacity = s.int("max_concurrent_requests", None, min=1)
        name = s.str("name", None) or _default_name(url)
        if not name.strip():
            raise s.error("name", "must not be empty")
        models = s.str_list("models", None)
        if models is not None and (not models or any(not m for m in models)):
            raise s.error("models", "expected a non-empty list of model names")
        weight = s.float("weight", 1.0, min=0.0)
        if weight is not None and weight <= 0:
            raise s.error("weight", "must be > 0 (use drain = true to take a node out)")
        drain = s.bool("drain", False)
        engine = s.choice("engine", "vllm", NODE_ENGINES)
        api_key = read_node_api_key(s)
        s.check_unknown()
        if name in names:
            raise s.error("name", f"duplicate node name {name!r} (also {names[name]})")
        if url in urls:
            raise s.error("url", f"duplicate url {url!r} (also {urls[url]})")
        names[name] = s.prefix
        urls[url] = s.prefix
        nodes.append(
            NodeConfig(
                name=name,
                url=url,
                capacity=capacity,
                models=tuple(models) if models is not None else None,
                weight=weight if weight is not None else 1.0,
                drain=drain,
                token=api_key,
                engine=engine,
            )
        )
    return tuple(nodes)


def _parse_agents(root: Section, path: Path | None, servers: tuple[NodeConfig, ...]) -> tuple[NodeConfig, ...]:
    """`[[agents]]`: node agents (`mvllm agent`), each with its url and the token of its API."""
    entries = root.raw("agents", [])
    if not isinstance(entries, list):
        raise root.error("agents", 'expected [[agents]] tables like url = "http://gpu-1:7070"')
    names = {n.name: "servers" for n in servers}
    urls = {n.url: "servers" for n in servers}
    agents: list[NodeConfig] = []
    for i, entry in enumerate(entries):
        s = Section(entry, path, f"agents[{i}]")
        url = _parse_url(s)
        name = s.str("name", None) or _default_name(url)
        if not name.strip():
            raise s.error("name", "must not be empty")
        if s.has("token") and s.has("token_env"):
            raise s.error("token", "give either token or token_env, not both")
        token = s.str("token", None)
        token_env = s.str("token_env", None)
        if token_env is not None:
            token = os.environ.get(token_env) or None
            if token is None:
                raise s.error("token_env", f"environment variable {token_env} is not set or empty")
        elif token is not None and not token:
            raise s.error("token", "must not be empty (leave it out for an agent without a token)")
        weight = s.float("weight", 1.0, min=0.0)
        if weight is not None and weight <= 0:
            raise s.error("weight", "must be > 0 (use drain = true to take an agent out)")
        drain = s.bool("drain", False)
        load_timeout = s.float("load_timeout", DEFAULT_LOAD_TIMEOUT, min=1.0)
        s.check_unknown()
        if name in names:
            raise s.error("name", f"duplicate node name {name!r} (also {names[name]})")
        if url in urls:
            raise s.error("url", f"duplicate url {url!r} (also {urls[url]})")
        names[name] = s.prefix
        urls[url] = s.prefix
        agents.append(
            NodeConfig(
                name=name,
                url=url,
                weight=weight if weight is not None else 1.0,
                drain=drain,
                kind="agent",
                token=token,
                load_timeout=load_timeout if load_timeout is not None else DEFAULT_LOAD_TIMEOUT,
            )
        )
    return tuple(agents)


def _parse_url(s: Section) -> str:
    raw = s.str("url", required=True)
    assert raw is not None
    try:
        url = URL(raw.strip())
    except ValueError:
        raise s.error("url", f"not a valid URL: {raw!r}") from None
    if url.scheme not in ("http", "https") or not url.host:
        raise s.error("url", f"expected http://host:port or https://host:port, got {raw!r}")
    path = url.path.rstrip("/")
    if path.endswith("/v1"):
        raise s.error("url", f"give the server's base URL without /v1 (e.g. {url.origin()}), got {raw!r}")
    return str(url.origin()) + path


def _default_name(url: str) -> str:
    u = URL(url)
    name = f"{u.host}:{u.port}" if u.port else str(u.host)
    path = u.path.rstrip("/")
    return name + path
