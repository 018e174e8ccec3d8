"""Pytest fixtures around the Hub-protocol test server (`hub_server.HubServer`).

Registered with `pytest_plugins = ["hub_fixtures"]` in tests/conftest.py, which must also set,
before anything imports huggingface_hub: HF_ENDPOINT=http://127.0.0.1:$HFMERGE_TEST_HUB_PORT,
HF_HUB_DISABLE_XET=1, HF_HUB_OFFLINE=1, HF_HOME (temp) and friends. huggingface_hub reads those
at import time, so the port is reserved up front and the server later binds exactly that port.

Fixtures:
- `hub_server` (session): the running server.
- `hub` (function): the same server with faults, request log and settings reset, online mode on
  for huggingface_hub, transformers and datasets, and a fresh HF cache (`hub_cache`).
- `hub_cache` (function): the fresh, empty HF_HUB_CACHE directory used by `hub`.
- `hf_token` (function): a token the server accepts, exported as HF_TOKEN.
- `hub_repo_id` (function): a fresh `test-user/<test-name>-xxxx` repo id.

Every huggingface_hub HTTP call also gets a timeout (`CLIENT_TIMEOUT_S`), because most client
calls pass `timeout=None` and would hang forever on a stalled server. It only ends a hang, so it is
far longer than any answer takes even on a busy machine (HFMERGE_TEST_HUB_TIMEOUT overrides it).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from hub_server import HubServer

__all__ = [
    "CLIENT_TIMEOUT_S",
    "HUB_TEST_TOKEN",
    "hf_token",
    "hub",
    "hub_cache",
    "hub_repo_id",
    "hub_server",
    "install_client_timeout",
]

HUB_TEST_TOKEN = "hf_hfmergeTestToken0000000000000000"
CLIENT_TIMEOUT_S = float(os.environ.get("HFMERGE_TEST_HUB_TIMEOUT", "300"))

# One server per process, even if the fixtures get registered twice (plugin + star import).
_SERVER: HubServer | None = None


def install_client_timeout(seconds: float = CLIENT_TIMEOUT_S) -> None:
    """Make every huggingface_hub request fail after `seconds` without progress.

    A client-level default is not enough: `model_info` & co pass `timeout=None` explicitly,
    which httpx treats as "no timeout". So the transport caps each request's timeouts.
    """
    import httpx2
    from huggingface_hub import set_client_factory
    from huggingface_hub.utils._http import hf_request_event_hook

    class _CappedTimeoutTransport(httpx2.HTTPTransport):
        def handle_request(self, request: httpx2.Request) -> httpx2.Response:
            timeouts = dict(request.extensions.get("timeout") or {})
            for key in ("connect", "read", "write", "pool"):
                value = timeouts.get(key)
                if value is None or value > seconds:
                    timeouts[key] = seconds
            request.extensions["timeout"] = timeouts
            return super().handle_request(request)

    def factory() -> httpx2.Client:
        # Same settings as huggingface_hub's default_client_factory, plus the capped transport.
        return httpx2.Client(
            event_hooks={"request": [hf_request_event_hook]},
            follow_redirects=True,
            timeout=seconds,
            transport=_CappedTimeoutTransport(),
        )

    set_client_factory(factory)


def _restore_default_client() -> None:
    from huggingface_hub import set_client_factory
    from huggingface_hub.utils._http import default_client_factory

    set_client_factory(default_client_factory)


def _configured_port() -> int:
    port = os.environ.get("HFMERGE_TEST_HUB_PORT")
    if not port:
        raise pytest.UsageError(
            "HFMERGE_TEST_HUB_PORT is not set: tests/conftest.py must reserve a port and set HF_ENDPOINT "
            "before huggingface_hub is imported"
        )
    return int(port)


@pytest.fixture(scope="session")
def hub_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubServer]:
    """The Hub-protocol server on the port that HF_ENDPOINT names (session-wide)."""
    global _SERVER
    if _SERVER is not None:
        yield _SERVER
        return
    port = _configured_port()
    from huggingface_hub import constants

    expected = f"http://127.0.0.1:{port}"
    if constants.ENDPOINT != expected:
        # The trap: huggingface_hub was imported before conftest set HF_ENDPOINT.
        raise pytest.UsageError(
            f"huggingface_hub.constants.ENDPOINT is {constants.ENDPOINT!r}, expected {expected!r}: "
            "something imported huggingface_hub before tests/conftest.py set HF_ENDPOINT"
        )
    server = HubServer(tmp_path_factory.mktemp("hub-server"), port=port).start()
    _SERVER = server
    install_client_timeout(CLIENT_TIMEOUT_S)
    try:
        yield server
    finally:
        _restore_default_client()
        server.stop()
        _SERVER = None


@pytest.fixture
def hub_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh, empty HF_HUB_CACHE for this test (env var and the module constants that copy it)."""
    from huggingface_hub import constants
    from huggingface_hub.utils import _cache_manager

    path = tmp_path_factory.mktemp("hf-hub-cache")
    monkeypatch.setenv("HF_HUB_CACHE", str(path))
    # file_download, snapshot_download, transformers and resolve_revision read this at call time.
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(path))
    # scan_cache_dir's default was copied at import.
    monkeypatch.setattr(_cache_manager, "HF_HUB_CACHE", str(path))
    return path


@pytest.fixture
def hub(hub_server: HubServer, hub_cache: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[HubServer]:
    """The server, reset for this test, with the Hub clients switched online and a fresh cache."""
    from huggingface_hub import constants

    hub_server.reset()
    offline_before = constants.HF_HUB_OFFLINE
    # huggingface_hub's is_offline_mode() returns constants.HF_HUB_OFFLINE at call time, and
    # transformers 5 uses that same function; the env var covers modules imported later.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    # Xet would take over LFS uploads and then fail on a server without Xet.
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    # No ambient token: tests that need one ask for `hf_token`.
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    # datasets copies the offline flag into its own config at import time.
    datasets_loaded = "datasets.config" in sys.modules
    if datasets_loaded:
        ds_config = sys.modules["datasets.config"]
        monkeypatch.setattr(ds_config, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(ds_config, "HF_DATASETS_OFFLINE", False, raising=False)
    yield hub_server
    if not datasets_loaded and "datasets.config" in sys.modules:
        # Imported during this test while online: put it back to the session's setting.
        ds_config = sys.modules["datasets.config"]
        ds_config.HF_HUB_OFFLINE = offline_before
        ds_config.HF_DATASETS_OFFLINE = offline_before
    errors = list(hub_server.internal_errors)
    if errors:
        pytest.fail("hub server crashed while handling a request:\n" + "\n".join(errors), pytrace=False)


@pytest.fixture
def hf_token(hub: HubServer, monkeypatch: pytest.MonkeyPatch) -> str:
    """A token the server accepts, exported as HF_TOKEN (add it to `hub.tokens` if you restrict them)."""
    if hub.tokens is not None:
        hub.tokens.add(HUB_TEST_TOKEN)
    monkeypatch.setenv("HF_TOKEN", HUB_TEST_TOKEN)
    return HUB_TEST_TOKEN


@pytest.fixture
def hub_repo_id(hub: HubServer, request: pytest.FixtureRequest) -> str:
    """A repo id nobody used yet, named after the test."""
    return hub.unique_repo_id(request.node.name)
