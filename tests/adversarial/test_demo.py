"""The corpus through the demo: the chat handler in this process, and a few cases over HTTP.

A refused turn must come back as a notice (gr.Warning, or gr.Info for an empty message) and an error note
in the chat that say what is wrong; a sane turn gets an answer. Over HTTP, the server must answer a good
request after every bad one.
"""

from __future__ import annotations

import json
import re
import threading
from pathlib import Path

import gradio as gr
import httpx
import pytest
from gradio.utils import get_upload_folder
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError

from mmgen.app import launch
from mmgen.app.chat import ERROR_TITLE, GenerationSettings
from mmgen.app.demo import respond
from mmgen.app.testing import tiny_random_pipeline

from ..conftest import free_port, running_demo
from .cases import BY_NAME, EMPTY_DEMO, IMAGES, MODELS, Case, cases_for
from .conftest import FAST

# The cases sent to a real server with gradio_client, and as raw JSON (paths a client never uploaded, and
# text gradio_client cannot encode); the rest run against the handler only.
OVER_HTTP = ["zero_byte_image", "decompression_bomb_20000", "compression_unknown", "steps_huge"]
RAW_HTTP = ["absolute_path_outside", "path_traversal_from_upload_folder", "history_file_outside_uploads",
            "lone_surrogate"]


def controls(case: Case) -> list:
    """The `/chat` endpoint's controls, in `GenerationSettings` order: fast defaults and the case's values."""
    values = {**GenerationSettings().__dict__, **FAST, **case.params}
    return [values[name] for name in GenerationSettings.__dataclass_fields__]


def message_of(case: Case, folder) -> dict:
    files = case.files if case.files is not None else [str(IMAGES[case.image](folder))] if case.image else []
    return {"text": case.text, "files": files}


def error_notes(chat: list) -> list[str]:
    def text(content) -> str:
        if isinstance(content, list):  # as the chat comes back over HTTP
            return " ".join(item.get("text", "") for item in content)
        return content

    return [text(m["content"]) for m in chat if (m.get("metadata") or {}).get("title") == ERROR_TITLE]


@pytest.fixture(scope="module")
def demo_pipe():
    return tiny_random_pipeline()


@pytest.fixture
def notices(monkeypatch) -> list[str]:
    """What the handler showed as gr.Warning or gr.Info toasts."""
    shown: list[str] = []
    monkeypatch.setattr(gr, "Warning", lambda message, *args, **kwargs: shown.append(message))
    monkeypatch.setattr(gr, "Info", lambda message, *args, **kwargs: shown.append(message))
    return shown


@pytest.mark.parametrize("case", cases_for("demo", kind="generate"))
def test_chat_handler(case, demo_pipe, upload_dir, notices):
    history = case.history if case.history is not None else []
    *_, (chat, stats) = respond(demo_pipe, threading.Lock(), message_of(case, upload_dir), history,
                                *controls(case))
    expected = case.expected("demo")
    if expected is None:
        assert not notices and not error_notes(chat)
        assert chat[-1]["role"] == "assistant" and "text tokens/s" in stats
        return
    assert any(re.search(expected, n) for n in notices), f"{expected!r} not in {notices}"
    if expected != EMPTY_DEMO:
        assert [n for n in error_notes(chat) if re.search(expected, n)], "the chat shows the reason too"
        assert stats == ""


@pytest.mark.parametrize("case", cases_for("demo", kind="model"))
def test_launch_refuses_a_bad_model_folder_before_serving(case, model_dir, tmp_path):
    folder = MODELS[case.model](model_dir, tmp_path / "model")
    with pytest.raises(ValueError, match=case.expected("demo")):
        launch(str(folder), port=free_port())


@pytest.fixture(scope="module")
def server(demo_pipe):
    with running_demo(demo_pipe) as demo:
        yield demo


@pytest.fixture(scope="module")
def client(server):
    return Client(server.local_url, verbose=False, download_files=False)


def ask(client: Client, case: Case, folder) -> list:
    """The chat after sending `case` with gradio_client, which uploads the attached files first."""
    message = message_of(case, folder)
    message["files"] = [handle_file(path) for path in message["files"]]
    history = case.history if case.history is not None else []
    chat, _ = client.predict(message, history, *controls(case), api_name="/chat")
    return chat


def post(server, case: Case) -> tuple[str, object]:
    """Send `case` as raw JSON, as a client that skips gradio_client would: file paths go as they are, never
    uploaded. Returns the last server-sent event and its data."""
    def as_file(path) -> dict:
        return {"path": str(path), "meta": {"_type": "gradio.FileData"}}

    message = message_of(case, Path(get_upload_folder()))
    message["files"] = [as_file(path) for path in message["files"]]
    history = [{**m, "content": [{"type": "file", "file": as_file(i["file"]["path"])} for i in m["content"]]}
               for m in case.history or []]
    body = {"data": [message, history, *controls(case)]}
    api = f"{server.local_url}gradio_api/call/chat"
    sent = json.dumps(body)  # ASCII escapes carry even a lone surrogate
    event_id = httpx.post(api, content=sent, headers={"content-type": "application/json"}).json()["event_id"]
    lines = httpx.get(f"{api}/{event_id}", timeout=600).text.strip().splitlines()
    event, data = lines[-2].removeprefix("event: "), json.loads(lines[-1].removeprefix("data: "))
    return event, data


def refusal(case: Case, chat: list) -> None:
    expected = case.expected("http")
    assert [n for n in error_notes(chat) if re.search(expected, n)], error_notes(chat)


def good_request_is_answered(client: Client, folder) -> None:
    chat = ask(client, Case("good"), folder)
    assert not error_notes(chat) and chat[-1]["role"] == "assistant"


@pytest.mark.parametrize("name", OVER_HTTP)
def test_over_http_the_reason_is_shown_and_the_server_answers_the_next_request(name, client, tmp_path):
    case = BY_NAME[name]
    try:
        chat = ask(client, case, tmp_path)
    except AppError as err:  # refused by Gradio's own checks before the handler ran
        assert re.search(case.expected("http"), str(err)), str(err)
    else:
        refusal(case, chat)
    good_request_is_answered(client, tmp_path)


@pytest.mark.parametrize("name", RAW_HTTP)
def test_raw_requests_cannot_reach_files_that_were_not_uploaded(name, server, client, tmp_path):
    case = BY_NAME[name]
    event, data = post(server, case)
    if event == "error":
        assert re.search(case.expected("http"), data["error"]), data
    else:
        assert event == "complete"
        refusal(case, data[0])
    assert "root:x:" not in json.dumps(data)
    good_request_is_answered(client, tmp_path)
