"""The router app's typed keys, in a leaf module so that the app and its admin routes both use
them without importing each other."""

from __future__ import annotations

from aiohttp import web

from mvllm.router.fleet.scraper import Scraper
from mvllm.router.state import RouterState

STATE_KEY = web.AppKey("mvllm_router_state", RouterState)
SCRAPER_KEY = web.AppKey("mvllm_router_scraper", Scraper)
CONFIG_PATH_KEY = web.AppKey("mvllm_router_config_path", str)
