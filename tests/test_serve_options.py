"""vLLM's serving options: --max-model-len, --chat-template (engine), and
HTTPS (--ssl-certfile / --ssl-keyfile) and --root-path (gateway)."""

from __future__ import annotations

import socket
import ssl
import threading
import time

import httpx
import pytest
import trustme
import uvicorn

from pad_core.engine import BASE_RUNNER
from pad_core.errors import InvalidRequestError, ModelLoadError
from pad_core.model_loading import engine_for_model
from pad_core.settings import EngineSettings
from pad_core.testing import embedded_tokenizer, tiny_model
from pad_core.types import ChatRequest, SamplingParams
from server.app import create_app
from server.cli import main, uvicorn_options
from server.settings import ServerSettings

HELLO = [{"role": "user", "content": "Hello"}]


def engine(**settings):
    return engine_for_model(tiny_model(context_length=512), embedded_tokenizer(), EngineSettings(**settings))


# ---- max_model_len ------------------------------------------------------------


def test_max_model_len_caps_the_context_served():
    capped = engine(max_model_len=128)
    assert capped.context_length == 128 and engine().context_length == 512
    prompt = [{"role": "user", "content": "word " * 150}]  # ~150 tokens: fits 512, not 128
    capped_chat = ChatRequest("r", prompt, [], SamplingParams(max_tokens=4))
    with pytest.raises(InvalidRequestError) as exceeded:
        capped.add_chat(capped_chat)
    assert exceeded.value.code == "context_length_exceeded" and "128" in exceeded.value.message
    engine().add_chat(ChatRequest("r", prompt, [], SamplingParams(max_tokens=4)))


def test_max_model_len_caps_a_kv_pools_rows():
    pooled = engine(max_model_len=96, backend="slots", kv_pool_gib=0.05, max_running_requests=2)
    assert pooled.context_length == 96 and pooled.runners[BASE_RUNNER].slot_tokens == 96


def test_max_model_len_beyond_the_models_is_a_load_error():
    with pytest.raises(ModelLoadError, match="longer than the model's context length"):
        engine(max_model_len=1024)


# ---- chat_template ------------------------------------------------------------


def rendered(built) -> str:
    return built.tokenizer.decode(built.prompts.encode(HELLO))


def test_a_chat_template_given_as_text_or_as_a_file(tmp_path):
    template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}<assistant>"
    assert rendered(engine(chat_template=template)) == "<user>Hello\n<assistant>"
    path = tmp_path / "template.jinja"
    path.write_text("{{ messages[-1].content | upper }} =>")
    assert rendered(engine(chat_template=str(path))) == "HELLO =>"
    assert rendered(engine()).startswith("<|im_start|>system")  # the shared tokenizer is left as it was


def test_a_bad_chat_template_is_a_load_error(tmp_path):
    with pytest.raises(ModelLoadError, match="neither a readable file nor a Jinja template"):
        engine(chat_template=str(tmp_path / "missing.jinja"))
    with pytest.raises(ModelLoadError, match="does not compile"):
        engine(chat_template="{% for m in messages %}{{ m.content }}")


# ---- HTTPS and root_path --------------------------------------------------------


def serve(app, settings: ServerSettings):
    """Serves `app` with `pad serve`'s uvicorn options on a free port; returns (server, port)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    options = {**uvicorn_options(settings), "host": "127.0.0.1", "port": port, "log_level": "warning"}
    server = uvicorn.Server(uvicorn.Config(app, **options))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.05)
    return server, thread, port


@pytest.fixture
def certificate(tmp_path):
    authority = trustme.CA()
    issued = authority.issue_cert("127.0.0.1")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    issued.cert_chain_pems[0].write_to_path(str(cert))
    issued.private_key_pem.write_to_path(str(key))
    trusted = ssl.create_default_context()
    authority.configure_trust(trusted)
    return cert, key, trusted


def test_https_with_a_certificate(tmp_path, certificate):
    cert, key, trusted = certificate
    settings = ServerSettings(data_dir=tmp_path, ssl_certfile=str(cert), ssl_keyfile=str(key))
    server, thread, port = serve(create_app(settings, start_worker=False), settings)
    try:
        answer = httpx.get(f"https://127.0.0.1:{port}/v1/models", verify=trusted)
        assert answer.status_code == 200 and answer.json()["object"] == "list"
        with pytest.raises(httpx.HTTPError):  # no plain HTTP on an HTTPS port
            httpx.get(f"http://127.0.0.1:{port}/v1/models")
    finally:
        server.should_exit = True
        thread.join(10)


def test_a_wrong_certificate_or_half_a_pair_is_a_start_up_error(tmp_path, certificate, capsys):
    cert, key, _ = certificate
    data = ["--data-dir", str(tmp_path)]
    assert main(["serve", *data, "--ssl-certfile", str(key), "--ssl-keyfile", str(key)]) == 2
    assert "cannot serve HTTPS" in capsys.readouterr().err
    assert main(["serve", *data, "--ssl-certfile", str(tmp_path / "none.pem"), "--ssl-keyfile", str(key)]) == 2
    assert "cannot serve HTTPS" in capsys.readouterr().err
    assert main(["serve", *data, "--ssl-certfile", str(cert)]) == 2
    assert "ssl_certfile and ssl_keyfile go together" in capsys.readouterr().err


def test_root_path_behind_a_proxy_that_strips_it(tmp_path):
    settings = ServerSettings(data_dir=tmp_path, root_path="/pad")
    server, thread, port = serve(create_app(settings, start_worker=False), settings)
    try:
        base = f"http://127.0.0.1:{port}"
        assert httpx.get(f"{base}/v1/models").status_code == 200  # the proxy sends the path without /pad
        assert httpx.get(f"{base}/openapi.json").json()["servers"] == [{"url": "/pad"}]
        assert "/pad/openapi.json" in httpx.get(f"{base}/docs").text  # the docs page loads it through the proxy
    finally:
        server.should_exit = True
        thread.join(10)
