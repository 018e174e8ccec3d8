"""Test-wide set-up.

huggingface_hub reads its endpoint, offline flag and Xet switch when it is imported, so they
are set here, before any test module imports it. Nothing in the suite may reach a real Hub:
the endpoint points at a port on 127.0.0.1 where the Hub-protocol test server runs when a test
asks for it, and offline mode is on unless a test opts in through the `hub` fixture.
"""

from __future__ import annotations

import os
import socket
import tempfile


def _reserve_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


_PORT = _reserve_port()
_HF_HOME = tempfile.mkdtemp(prefix="hfmerge-tests-hf-home-")
os.environ["HFMERGE_TEST_HUB_PORT"] = str(_PORT)
os.environ["HF_ENDPOINT"] = f"http://127.0.0.1:{_PORT}"
os.environ["HF_HOME"] = _HF_HOME
os.environ["HF_HUB_CACHE"] = os.path.join(_HF_HOME, "hub")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_XET"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["DISABLE_SAFETENSORS_CONVERSION"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ.pop("HF_TOKEN", None)

pytest_plugins = ["model_fixtures", "hub_fixtures"]
