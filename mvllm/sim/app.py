"""HTTP face of the simulated engine: vLLM 0.25's routes and shapes on aiohttp.

`build_app(config)` gives a ready `web.Application` (the engine loop is owned by its cleanup_ctx), so
tests and demos can run simulated engines in-process; `mvllm sim serve` runs the same app on a port.
Run it with `handler_cancellation=True` (the CLI does) so a client that disconnects aborts its request.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from mvllm.common.tasks import background_task
from mvllm.sim import pooling, protocol, responses, textgen, tokenizer
from mvllm.sim.config import FAIL_KINDS, GIB, VLLM_VERSION, SimConfig
from mvllm.sim.engine import Engine
from mvllm.sim.faults import FaultInjector
from mvllm.sim.generation import Generation, drop_connection, json_response, new_seq
from mvllm.sim.metrics import SimMetrics
from mvllm.sim.protocol import ApiError, GenRequest

GUARDED_PREFIXES = ("/v1", "/v2", "/inference")  # what --api-key protects, as vLLM's middleware
# vLLM 0.25 with --enable-lora: reload_weights after a level-2 sleep fails in the weight loader
# (the LoRA-wrapped model no longer has the names the checkpoint uses) and the engine core dies.
LORA_RELOAD_ERROR = "There is no module or parameter named 'embed_tokens.weight'"
ENGINE_DEAD_MESSAGE = "EngineCore encountered an issue. See stack trace (above) for the root cause."
DEAD_EXIT_S = 1.0  # a dead engine answers 500 (health 503) this long, then the process exits 1


@dataclass
class SimState:
    """Mutable state of one simulated server besides the engine."""

    loras: dict[str, str] = field(default_factory=dict)  # name -> path, in load order
    faults: FaultInjector = field(default_factory=FaultInjector)
    in_flight: int = 0  # requests being served (for /load)
    crash: Callable[[], None] = field(default=lambda: os._exit(1))
    dead: str | None = None  # why the engine core died; the server then only answers errors


CONFIG = web.AppKey("sim_config", SimConfig)
ENGINE = web.AppKey("sim_engine", Engine)
METRICS = web.AppKey("sim_metrics", SimMetrics)
STATE = web.AppKey("sim_state", SimState)


def check_kv_fits(cfg: SimConfig) -> None:
    """vLLM refuses to start when the KV cache cannot hold one request of max_model_len."""
    if cfg.num_gpu_blocks <= 0:
        raise ValueError(
            "No available memory for the cache blocks. Try increasing `gpu_memory_utilization` "
            "when initializing the engine."
        )
    if cfg.kv_cache_size_tokens < cfg.max_model_len:
        need = cfg.max_model_len * cfg.kv_bytes_per_token / cfg.tensor_parallel_size / GIB
        have = cfg.kv_bytes_per_gpu / GIB
        raise ValueError(
            f"To serve at least one request with the models's max seq len ({cfg.max_model_len}), "
            f"({need:.2f} GiB KV cache is needed, which is larger than the available KV cache memory "
            f"({have:.2f} GiB). Based on the available memory, the estimated maximum model length is "
            f"{cfg.kv_cache_size_tokens}. Try increasing `gpu_memory_utilization` or decreasing "
            f"`max_model_len` when initializing the engine."
        )


def build_app(config: SimConfig, *, crash: Callable[[], None] | None = None) -> web.Application:
    """The simulated engine as an aiohttp application. `crash` replaces the process exit of the
    `crash` fault (for in-process use)."""
    check_kv_fits(config)
    metrics = SimMetrics(config)
    engine = Engine(config, observer=metrics)
    metrics.attach(engine)
    state = SimState(faults=FaultInjector(config.fail_kind, config.fail_rate, config.seed))
    if crash is not None:
        state.crash = crash
    api = _Api(config, engine, metrics, state)
    app = web.Application(
        middlewares=[api.observe_middleware, api.dead_middleware, api.auth_middleware], client_max_size=64 << 20
    )
    app[CONFIG] = config
    app[ENGINE] = engine
    app[METRICS] = metrics
    app[STATE] = state
    app.cleanup_ctx.append(api.engine_loop)
    api.add_routes(app.router)
    return app


def _error(err: ApiError) -> web.Response:
    return json_response(err.body(), err.status)


def _empty() -> web.Response:
    # vLLM answers these with a bare 200: no body, no content type.
    return web.Response(status=200)


class _Api:
    def __init__(self, cfg: SimConfig, engine: Engine, metrics: SimMetrics, state: SimState) -> None:
        self.cfg = cfg
        self.engine = engine
        self.metrics = metrics
        self.state = state
        parallel = f"-tp{cfg.tensor_parallel_size}" if cfg.tensor_parallel_size > 1 else ""
        digest = textgen.stable_rng("fingerprint", cfg.model, cfg.seed).getrandbits(32)
        self.fingerprint = f"vllm-{VLLM_VERSION}{parallel}-{digest:08x}"

    # --- app plumbing --------------------------------------------------------------------------
    async def engine_loop(self, app: web.Application) -> AsyncIterator[None]:
        async with background_task(self.engine.run(), name="sim-engine"):
            try:
                yield
            finally:
                self.engine.abort_all("abort")

    @web.middleware
    async def observe_middleware(self, request: web.Request, handler: Callable[[web.Request], Awaitable]) -> web.StreamResponse:
        """FastAPI-style 404/405 bodies, and the `http_requests_total` counter vLLM exposes."""
        route = request.match_info.route
        name = route.resource.canonical if route.resource is not None else "none"
        try:
            resp = await handler(request)
        except web.HTTPNotFound:
            resp = json_response({"detail": "Not Found"}, 404)
            name = "none"
        except web.HTTPMethodNotAllowed as exc:
            resp = json_response({"detail": "Method Not Allowed"}, 405)
            resp.headers["Allow"] = ", ".join(sorted(exc.allowed_methods))
            name = "none"
        self.metrics.count_http(name, request.method, resp.status)
        return resp

    @web.middleware
    async def dead_middleware(self, request: web.Request, handler: Callable[[web.Request], Awaitable]) -> web.StreamResponse:
        """After the engine core died: /health 503 (as vLLM's EngineDeadError), everything else 500."""
        if self.state.dead is None or request.path.startswith("/sim/"):
            return await handler(request)
        if request.path in ("/health", "/ping"):
            return web.Response(status=503)
        return _error(ApiError(500, ENGINE_DEAD_MESSAGE, "InternalServerError"))

    @web.middleware
    async def auth_middleware(self, request: web.Request, handler: Callable[[web.Request], Awaitable]) -> web.StreamResponse:
        if self.cfg.api_keys and request.method != "OPTIONS" and request.path.startswith(GUARDED_PREFIXES):
            scheme, _, token = request.headers.get("Authorization", "").partition(" ")
            if scheme.lower() != "bearer" or token not in self.cfg.api_keys:
                return json_response({"error": "Unauthorized"}, 401)
        return await handler(request)

    def add_routes(self, r: web.UrlDispatcher) -> None:
        r.add_get("/health", self.health)
        r.add_get("/ping", self.health)
        r.add_post("/ping", self.health)
        r.add_get("/version", self.version)
        r.add_get("/load", self.load)
        r.add_get("/metrics", self.metrics_text)
        r.add_get("/v1/models", self.models)
        r.add_post("/v1/chat/completions", self.chat)
        r.add_post("/v1/completions", self.completions)
        r.add_post("/v1/responses", self.responses)
        r.add_post("/v1/embeddings", self.embeddings)
        for path in ("/rerank", "/v1/rerank", "/v2/rerank"):
            r.add_post(path, self.rerank)
        for path in ("/score", "/v1/score"):
            r.add_post(path, self.score)
        r.add_post("/tokenize", self.tokenize)
        r.add_post("/detokenize", self.detokenize)
        if self.cfg.dev_mode:  # as vLLM: mounted by the environment switch alone
            r.add_post("/sleep", self.sleep)
            r.add_post("/wake_up", self.wake_up)
            r.add_get("/is_sleeping", self.is_sleeping)
            r.add_post("/collective_rpc", self.collective_rpc)
            r.add_post("/reset_prefix_cache", self.reset_prefix_cache)
        if self.cfg.runtime_lora_updating:
            r.add_post("/v1/load_lora_adapter", self.load_lora)
            r.add_post("/v1/unload_lora_adapter", self.unload_lora)
        r.add_get("/sim/state", self.sim_state)
        r.add_post("/sim/fault", self.sim_fault)

    async def _body(self, request: web.Request) -> dict:
        return protocol.parse_json_object(await request.read(), request.content_type)

    def _resolve_model(self, name: str | None) -> tuple[str, str | None]:
        """(model name for the response, LoRA adapter or None); unknown names are vLLM's 404."""
        if not name or name in self.cfg.served_model_names:
            return self.cfg.model_name, None
        if name in self.state.loras:
            return name, name
        raise protocol.not_found_model(name)

    # --- plain endpoints -----------------------------------------------------------------------
    async def health(self, request: web.Request) -> web.Response:
        return _empty()

    async def version(self, request: web.Request) -> web.Response:
        return json_response({"version": VLLM_VERSION})

    async def load(self, request: web.Request) -> web.Response:
        load = self.state.in_flight if self.cfg.enable_server_load_tracking else 0
        return json_response({"server_load": load})

    async def metrics_text(self, request: web.Request) -> web.Response:
        body = generate_latest(self.metrics.registry)
        resp = web.Response(body=body)
        resp.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return resp

    async def models(self, request: web.Request) -> web.Response:
        now = int(time.time())
        cards = [responses.model_card(n, self.cfg.model, None, self.cfg.max_model_len, now)
                 for n in self.cfg.served_model_names]
        cards += [responses.model_card(name, path, self.cfg.model_name, None, now)
                  for name, path in self.state.loras.items()]
        return json_response({"object": "list", "data": cards})

    # --- faults --------------------------------------------------------------------------------
    async def _apply_fault(self, request: web.Request, fault: str | None) -> web.StreamResponse | None:
        """Act on a drawn fault. Returns a response to send, or None to serve the request
        (`midstream` is carried out while answering)."""
        if fault is None or fault == "midstream":
            return None
        if fault == "500":
            return _error(ApiError(500, "Simulated engine failure (mvllm sim fault 500).", "InternalServerError"))
        if fault == "503":
            return _error(ApiError(503, "Simulated engine overload (mvllm sim fault 503).", "Service Unavailable"))
        if fault == "crash":
            print("mvllm sim: injected crash, exiting with code 1", file=sys.stderr, flush=True)
            self.state.crash()
            raise ConnectionResetError("simulated crash")  # only reached when `crash` was replaced
        if fault == "reset":
            drop_connection(request)
            return web.Response(status=500)  # never sent: the connection is gone
        # hang: accepted, never answered (ends when the client goes away or the server stops).
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    # --- generation ----------------------------------------------------------------------------
    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, protocol.parse_chat, "chatcmpl")

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, protocol.parse_completion, "cmpl")

    async def _generate(self, request: web.Request, parse: Callable[[dict], GenRequest], prefix: str) -> web.StreamResponse:
        fault = self.state.faults.draw()
        try:
            early = await self._apply_fault(request, fault)
            if early is not None:
                return early
            req = parse(await self._body(request))
            model_name, lora = self._resolve_model(req.model)
            protocol.check_n(req, self.cfg.max_n_sequences)
            protocol.check_lengths(req, self.cfg.max_model_len)
        except ApiError as err:
            return _error(err)
        req_id = f"{prefix}-{request.headers.get('X-Request-Id') or responses.random_id()}"
        gen = Generation(self.cfg, self.engine, self.fingerprint, request, req, req_id, model_name, lora,
                         fault == "midstream")
        return await self._counted(gen.run())

    async def _counted(self, work: Awaitable[web.StreamResponse]) -> web.StreamResponse:
        """Track requests in flight (for /load)."""
        self.state.in_flight += 1
        try:
            return await work
        finally:
            self.state.in_flight -= 1

    # --- /v1/responses (minimal) ---------------------------------------------------------------
    async def responses(self, request: web.Request) -> web.StreamResponse:
        fault = self.state.faults.draw()
        try:
            early = await self._apply_fault(request, fault)
            if early is not None:
                return early
            body = await self._body(request)
            messages = protocol.responses_messages(body)
            req = GenRequest(kind="chat", model=body.get("model"), prompts=[protocol.chat_prompt(messages)])
            max_out = body.get("max_output_tokens")
            if max_out is not None:
                if not isinstance(max_out, int) or isinstance(max_out, bool) or max_out < 1:
                    raise protocol.validation_error(f"max_output_tokens must be at least 1, got {max_out}.",
                                                    "max_output_tokens", max_out)
                req.max_tokens, req.max_tokens_param = max_out, "max_output_tokens"
            req.stream = bool(body.get("stream"))
            model_name, lora = self._resolve_model(req.model)
            protocol.check_lengths(req, self.cfg.max_model_len)
        except ApiError as err:
            return _error(err)
        gen = Generation(self.cfg, self.engine, self.fingerprint, request, req, f"resp_{responses.random_id()}",
                         model_name, lora, fault == "midstream", responses_api=True)
        return await self._counted(gen.run())

    # --- pooling -------------------------------------------------------------------------------
    async def _pool(self, request: web.Request, model: str | None, prompts: list[protocol.Prompt]) -> str:
        """Run prompt-only sequences through the engine (they queue and prefill like any request);
        returns the response model name."""
        model_name, lora = self._resolve_model(model)
        for p in prompts:
            if len(p.token_ids) > self.cfg.max_model_len:
                raise protocol.validation_error(
                    f"This model's maximum context length is {self.cfg.max_model_len} tokens. However, you "
                    f"requested 0 output tokens and your prompt contains {len(p.token_ids)} input tokens, for "
                    f"a total of {len(p.token_ids)} tokens. Please reduce the length of the input prompt or "
                    f"the number of requested output tokens.", "input_tokens", len(p.token_ids))
        done: asyncio.Queue[int] = asyncio.Queue()
        seqs = []
        for i, p in enumerate(prompts):
            seq = new_seq(self.cfg, self.engine, p, 0, "stop", lora, i, pooling_only=True)
            seq.sink = lambda s, reason: done.put_nowait(s.index) if reason is not None else None
            seqs.append(seq)
        self.state.in_flight += 1
        try:
            for seq in seqs:
                self.engine.submit(seq)
            for _ in seqs:
                await done.get()
        finally:
            self.state.in_flight -= 1
            for seq in seqs:
                self.engine.abort(seq)
        return model_name

    async def _pooling_prelude(self, request: web.Request) -> tuple[web.StreamResponse | None, dict]:
        fault = self.state.faults.draw()
        if fault == "midstream":
            fault = "reset"  # nothing streams here: drop the connection instead
        early = await self._apply_fault(request, fault)
        return early, ({} if early is not None else await self._body(request))

    async def embeddings(self, request: web.Request) -> web.StreamResponse:
        try:
            early, body = await self._pooling_prelude(request)
            if early is not None:
                return early
            inputs = body.get("input")
            if isinstance(inputs, list) and inputs and all(isinstance(x, int) and not isinstance(x, bool) for x in inputs):
                prompts = [protocol.token_prompt(inputs)]
            elif isinstance(inputs, list) and inputs and all(isinstance(x, list) for x in inputs):
                prompts = [protocol.token_prompt(x) for x in inputs]
            else:
                prompts = [protocol.text_prompt(t) for t in protocol.as_text_list(inputs, "input")]
            fmt = body.get("encoding_format") or "float"
            if fmt not in ("float", "base64"):
                raise protocol.bad_request_body("Input should be 'float' or 'base64' (encoding_format)",
                                                "body.encoding_format")
            dims = body.get("dimensions")
            if dims is not None and (not isinstance(dims, int) or not 1 <= dims <= self.cfg.embedding_dim):
                raise protocol.validation_error(
                    f"dimensions must be between 1 and {self.cfg.embedding_dim}, got {dims}.", "dimensions", dims)
            model_name = await self._pool(request, body.get("model"), prompts)
        except ApiError as err:
            return _error(err)
        data = []
        for i, p in enumerate(prompts):
            vec = pooling.embed(p.token_ids, self.cfg.embedding_dim, self.cfg.seed)
            if dims is not None:
                vec = pooling.truncate(vec, dims)
            data.append({"index": i, "object": "embedding",
                         "embedding": pooling.to_base64(vec) if fmt == "base64" else vec})
        n_tokens = sum(len(p.token_ids) for p in prompts)
        return json_response({"id": f"embd-{responses.random_id()}", "object": "list", "created": int(time.time()),
                      "model": model_name, "data": data, "usage": responses.usage(n_tokens, 0)})

    async def rerank(self, request: web.Request) -> web.StreamResponse:
        try:
            early, body = await self._pooling_prelude(request)
            if early is not None:
                return early
            query = body.get("query")
            if not isinstance(query, str):
                raise protocol.bad_request_body("Field required (query)", "body.query")
            docs = protocol.as_text_list(body.get("documents"), "documents")
            top_n = body.get("top_n") or 0
            if not isinstance(top_n, int) or top_n < 0:
                raise protocol.bad_request_body("Input should be greater than or equal to 0 (top_n)", "body.top_n")
            pairs = [protocol.text_prompt(query + "\n" + d) for d in docs]
            model_name = await self._pool(request, body.get("model"), pairs)
        except ApiError as err:
            return _error(err)
        q = self._vec(query)
        results = [{"index": i, "document": {"text": d, "multi_modal": None},
                    "relevance_score": pooling.relevance(q, self._vec(d))} for i, d in enumerate(docs)]
        results.sort(key=lambda r: r["relevance_score"], reverse=True)
        if 0 < top_n < len(results):
            results = results[:top_n]
        n_tokens = sum(len(p.token_ids) for p in pairs)
        return json_response({"id": f"score-{responses.random_id()}", "model": model_name,
                      "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens}, "results": results})

    async def score(self, request: web.Request) -> web.StreamResponse:
        try:
            early, body = await self._pooling_prelude(request)
            if early is not None:
                return early
            for a, b in (("text_1", "text_2"), ("queries", "documents"), ("queries", "items"), ("data_1", "data_2")):
                if a in body and b in body:
                    left, right = protocol.as_text_list(body[a], a), protocol.as_text_list(body[b], b)
                    break
            else:
                raise protocol.bad_request_body("Field required (text_1 and text_2)", "body.text_1")
            if len(left) == 1:
                left = left * len(right)
            elif len(left) != len(right):
                raise protocol.validation_error("Input lengths must be either 1:1, 1:N or N:N", None)
            pairs = [protocol.text_prompt(x + "\n" + y) for x, y in zip(left, right, strict=True)]
            model_name = await self._pool(request, body.get("model"), pairs)
        except ApiError as err:
            return _error(err)
        data = [{"index": i, "object": "score", "score": pooling.relevance(self._vec(x), self._vec(y))}
                for i, (x, y) in enumerate(zip(left, right, strict=True))]
        n_tokens = sum(len(p.token_ids) for p in pairs)
        return json_response({"id": f"score-{responses.random_id()}", "object": "list", "created": int(time.time()),
                      "model": model_name, "data": data, "usage": responses.usage(n_tokens, 0)})

    def _vec(self, text: str) -> list[float]:
        return pooling.embed(tokenizer.encode(text), self.cfg.embedding_dim, self.cfg.seed)

    # --- tokenizer -----------------------------------------------------------------------------
    async def tokenize(self, request: web.Request) -> web.Response:
        try:
            body = await self._body(request)
            self._resolve_model(body.get("model"))
            if "messages" in body:
                messages = protocol.parse_messages(body)
                prompt = protocol.chat_prompt(messages, *protocol.generation_prompt_flags(body))
            elif isinstance(body.get("prompt"), str):
                prompt = protocol.text_prompt(body["prompt"], bool(body.get("add_special_tokens", True)))
            else:
                raise protocol.bad_request_body("Field required (prompt or messages)", "body.prompt")
        except ApiError as err:
            return _error(err)
        ids = prompt.token_ids
        strs = [tokenizer.token_text(i) for i in ids] if body.get("return_token_strs") else None
        return json_response({"count": len(ids), "max_model_len": self.cfg.max_model_len, "tokens": ids, "token_strs": strs})

    async def detokenize(self, request: web.Request) -> web.Response:
        try:
            body = await self._body(request)
            self._resolve_model(body.get("model"))
            tokens = body.get("tokens")
            if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
                raise protocol.bad_request_body("Input should be a valid list of integers (tokens)", "body.tokens")
            try:
                text = tokenizer.decode(tokens)
            except ValueError as exc:
                raise protocol.validation_error(str(exc), "tokens", None) from exc
        except ApiError as err:
            return _error(err)
        return json_response({"prompt": text})

    # --- dev mode: sleep, rpc, cache -----------------------------------------------------------
    async def sleep(self, request: web.Request) -> web.Response:
        raw_level = request.query.get("level", "1")
        mode = request.query.get("mode", "abort")
        try:
            level = int(raw_level)
        except ValueError:
            return _error(ApiError(400, f"invalid literal for int() with base 10: {raw_level!r}"))
        if mode not in ("abort", "wait", "keep"):
            return _error(protocol.validation_error(f"mode must be abort, wait or keep, got {mode!r}.", "mode", mode))
        await self.engine.sleep(level, mode)
        return _empty()

    async def wake_up(self, request: web.Request) -> web.Response:
        tags = request.query.getall("tags", [])  # unknown tags are ignored, as vLLM does
        await self.engine.wake_up([t for t in tags if t != "scheduling"] if tags else None)
        return _empty()

    async def is_sleeping(self, request: web.Request) -> web.Response:
        return json_response({"is_sleeping": self.engine.is_sleeping})

    async def collective_rpc(self, request: web.Request) -> web.Response:
        try:
            body = json.loads(await request.read())
        except RecursionError:
            return _error(ApiError(400, "JSON decode error: the body is nested too deeply", "Bad Request"))
        except ValueError as exc:
            return _error(ApiError(400, f"JSON decode error: {exc}", "Bad Request"))
        method = body.get("method") if isinstance(body, dict) else None
        if method is None:
            return _error(ApiError(400, "Missing 'method' in request body", "Bad Request"))
        if method != "reload_weights":
            # The simulator implements only reload_weights; vLLM's answer for a method it lacks.
            return _error(ApiError(500, f"Call to collective_rpc method failed: Method '{method}' is not "
                                        "implemented.", "InternalServerError"))
        if self.cfg.enable_lora and not self.engine.weights_valid:
            return self._die(LORA_RELOAD_ERROR)
        self.engine.reload_weights()
        return json_response({"results": [None] * self.cfg.tensor_parallel_size})

    def _die(self, why: str) -> web.Response:
        """The engine core failed inside a collective_rpc: answer 500, fail everything after, exit 1."""
        print(f"ERROR mvllm sim: EngineCore failed in collective_rpc: ValueError: {why}", file=sys.stderr, flush=True)
        self.state.dead = why
        self.engine.abort_all("error")
        asyncio.get_running_loop().call_later(DEAD_EXIT_S, self._exit_dead)
        return _error(ApiError(500, f"Call to collective_rpc method failed: {why}", "InternalServerError"))

    def _exit_dead(self) -> None:
        print("ERROR mvllm sim: engine core dead, shutting down (exit code 1)", file=sys.stderr, flush=True)
        with contextlib.suppress(RuntimeError):  # in-process sims raise instead of exiting
            self.state.crash()

    async def reset_prefix_cache(self, request: web.Request) -> web.Response:
        self.engine.reset_prefix_cache()
        return _empty()

    # --- LoRA ----------------------------------------------------------------------------------
    async def load_lora(self, request: web.Request) -> web.Response:
        try:
            body = await self._body(request)
            for key in ("lora_name", "lora_path"):
                if key not in body:
                    raise protocol.bad_request_body(f"Field required ({key})", f"body.{key}")
        except ApiError as err:
            return _error(err)
        name, path = body.get("lora_name"), body.get("lora_path")
        if not name or not path:
            return _error(ApiError(400, "Both 'lora_name' and 'lora_path' must be provided.", "InvalidUserInput"))
        if not self.cfg.enable_lora:
            return _error(ApiError(500, "LoRA is not enabled. Use --enable-lora to enable LoRA.", "InternalServerError"))
        if name in self.state.loras and not body.get("load_inplace"):
            return _error(ApiError(
                400, f"The lora adapter '{name}' has already been loaded. If you want to load the adapter in place, "
                     "set 'load_inplace' to True.", "InvalidUserInput"))
        self.state.loras[str(name)] = str(path)
        return web.Response(text=f"Success: LoRA adapter '{name}' added successfully.")

    async def unload_lora(self, request: web.Request) -> web.Response:
        try:
            body = await self._body(request)
        except ApiError as err:
            return _error(err)
        name = body.get("lora_name")
        if not name:
            return _error(ApiError(400, "'lora_name' needs to be provided to unload a LoRA adapter.",
                                   "InvalidUserInput"))
        if name not in self.state.loras:
            return _error(ApiError(404, f"The lora adapter '{name}' cannot be found.", "NotFoundError"))
        del self.state.loras[name]
        return web.Response(text=f"Success: LoRA adapter '{name}' removed successfully.")

    # --- simulator-only ------------------------------------------------------------------------
    async def sim_state(self, request: web.Request) -> web.Response:
        snap = self.engine.snapshot()
        return json_response({
            "memory_bytes": self.engine.memory_bytes(),
            "sleep_level": snap.sleep_level,
            "is_sleeping": self.engine.is_sleeping,
            "asleep_tags": sorted(self.engine.asleep_tags),
            "weights_valid": self.engine.weights_valid,
            "dead": self.state.dead,
            "running": snap.running,
            "waiting": snap.waiting,
            "kv_cache_usage": snap.kv_usage,
            "pid": os.getpid(),
            "model": self.cfg.model,
            "served_model_names": self.cfg.served_model_names,
            "loras": list(self.state.loras),
            "tensor_parallel_size": self.cfg.tensor_parallel_size,
            "gpu_memory_bytes": int(self.cfg.gpu_memory_gib * GIB),
            "weights_bytes": self.cfg.weights_bytes_per_gpu,
            "kv_cache_bytes": self.cfg.kv_bytes_per_gpu,
            "max_num_seqs": self.cfg.max_num_seqs,
            "fault": {"kind": self.state.faults.kind, "rate": self.state.faults.rate},
        })

    async def sim_fault(self, request: web.Request) -> web.Response:
        try:
            body = await self._body(request)
            kind = body.get("kind", self.state.faults.kind)
            rate = body.get("rate", 1.0)
            if kind not in FAIL_KINDS or isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 <= rate <= 1:
                raise protocol.bad_request_body(
                    f"kind must be one of {', '.join(FAIL_KINDS)} and rate within [0, 1]", "body")
        except ApiError as err:
            return _error(err)
        self.state.faults.configure(kind, float(rate))
        return json_response({"kind": kind, "rate": float(rate)})
