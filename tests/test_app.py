"""The Gradio demo, driven over HTTP with gradio_client against a tiny random pipeline on 127.0.0.1.

The server is started once for the module (`prevent_thread_lock`) and closed at the end. A few
specifications of the conversation logic and the upload checks run without the server.
"""

from __future__ import annotations

import inspect
import os
import threading
from pathlib import Path

import httpx
import PIL.Image
import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError

from mmgen.app import launch
from mmgen.app.chat import ERROR_TITLE, GenerationSettings, history_segments, spaced, stats_line
from mmgen.app.demo import compression_choices, drafter_choices, respond
from mmgen.app.example_prompts import EXAMPLES
from mmgen.app.testing import tiny_random_pipeline
from mmgen.app.uploads import MAX_UPLOAD_BYTES, UploadRejected, open_image
from mmgen.pipelines import GenerationStats
from mmgen.segments import Image, Text

from .conftest import free_port, png_declaring, running_demo

STORY = "a story in two pictures: a red circle. then the circle turns blue."
FAST = GenerationSettings(max_new_tokens=12, num_inference_steps=2, max_images=2)


def controls(**changes) -> list:
    """The controls of the `/chat` endpoint, in `GenerationSettings` order."""
    values = {**FAST.__dict__, **changes}
    return [values[name] for name in GenerationSettings.__dataclass_fields__]


def assistant_items(chat: list) -> list[dict]:
    """The content items of the answer messages (not the error notes)."""
    return [item for m in chat if m["role"] == "assistant" and not (m.get("metadata") or {}).get("title")
            for item in m["content"]]


def outline(chat: list) -> list[tuple]:
    """Each message as (role, texts and file paths): what a round trip through the server must keep."""
    return [(m["role"], [i.get("text") or i["file"]["path"] for i in m["content"]]) for m in chat]


def error_notes(chat: list) -> list[str]:
    return [item["text"] for m in chat if (m.get("metadata") or {}).get("title") == ERROR_TITLE
            for item in m["content"]]


@pytest.fixture(scope="module")
def pipe():
    return tiny_random_pipeline()


@pytest.fixture(scope="module")
def demo(pipe):
    with running_demo(pipe) as demo:
        yield demo


@pytest.fixture(scope="module")
def client(demo):
    return Client(demo.local_url, verbose=False, download_files=False)


def ask(client: Client, text: str, files=(), history=None, **changes) -> tuple[list, str]:
    chat, stats = client.predict(
        {"text": text, "files": [handle_file(str(f)) for f in files]}, history or [], *controls(**changes),
        api_name="/chat",
    )
    return chat, stats


# -- over HTTP ----------------------------------------------------------------------------------------
def test_story_prompt_streams_an_answer_of_text_and_images(client):
    job = client.submit({"text": STORY, "files": []}, [], *controls(), api_name="/chat")
    chat, stats = job.result(timeout=300)

    items = assistant_items(chat)
    assert chat[0]["role"] == "user" and chat[0]["content"][0]["text"] == STORY
    assert any(i["type"] == "text" and i["text"].strip() for i in items)
    images = [i for i in items if i["type"] == "file"]
    assert images and all(i["file"]["mime_type"] == "image/png" for i in images)
    served = httpx.get(images[0]["file"]["url"])
    assert served.status_code == 200 and served.content.startswith(b"\x89PNG")
    # It streamed: the answer grew over several updates before the final one.
    grown = {len(assistant_items(out[0])) for out in job.outputs()}
    assert len(grown) >= 3
    assert "text tokens/s" in stats and "s per image" in stats and "tokens per context image" in stats
    assert "τ" not in stats  # no drafter, no τ


def test_second_turn_answers_with_the_first_turns_images_in_context(client):
    first, _ = ask(client, STORY)
    second, _ = ask(client, "then the circle turns green.", history=first)

    assert outline(second[: len(first)]) == outline(first)
    assert [m["role"] for m in second[len(first):]] == ["user", "assistant"]
    assert not error_notes(second)
    assert assistant_items(second[len(first):])


def test_wrong_file_type_is_refused_with_a_message(client, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("not an image")
    with pytest.raises(AppError, match="Invalid file type"):
        ask(client, "what is this?", files=[notes])


def test_oversized_upload_is_refused_with_a_message(client, demo, tmp_path):
    big = tmp_path / "big.png"
    big.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(MAX_UPLOAD_BYTES))
    with pytest.raises(ValueError, match="exceeds the maximum file size"):
        ask(client, "what is this?", files=[big])
    # A client that skips its own check gets the server's refusal.
    with big.open("rb") as f:
        response = httpx.post(f"{demo.local_url}gradio_api/upload", files={"files": ("big.png", f, "image/png")})
    assert response.status_code == 413
    assert "maximum" in response.text.lower()


def test_file_that_is_not_the_image_its_name_says_gets_a_message_in_the_chat(client, tmp_path):
    fake = tmp_path / "fake.png"
    fake.write_text("this is text, not a PNG")
    chat, stats = ask(client, "describe the image.", files=[fake])

    assert any("not a readable PNG image" in note for note in error_notes(chat))
    assert not assistant_items(chat) and stats == ""


def test_decompression_bomb_upload_gets_a_message_in_the_chat(client, tmp_path):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_declaring(100_000, 100_000))
    chat, _ = ask(client, "describe the image.", files=[bomb])

    assert any("pixel limit" in note for note in error_notes(chat))


def test_unknown_compression_gets_a_message_and_the_server_still_answers(client):
    chat, stats = ask(client, STORY, compression="squash:3")
    assert any("unknown compression method 'squash'" in note for note in error_notes(chat))
    assert stats == ""

    chat, stats = ask(client, STORY, compression="pool:2")
    assert assistant_items(chat) and not error_notes(chat)
    assert "**4** tokens per context image" in stats  # the tiny model's 4×4 grid pooled 2×2


def test_choosing_a_drafter_either_drafts_or_says_why_not(client, pipe):
    drafter = next(name for name in drafter_choices(pipe) if name != "off")
    chat, stats = ask(client, STORY, drafter=drafter)
    notes = error_notes(chat)
    if notes:
        assert drafter in notes[0]
    else:
        assert "τ" in stats


def test_server_binds_localhost_serves_no_extra_folders_and_queues_with_a_limit(demo):
    assert inspect.signature(launch).parameters["host"].default == "127.0.0.1"
    assert demo.server_name == "127.0.0.1"
    assert demo.allowed_paths == []
    assert demo.max_file_size == MAX_UPLOAD_BYTES
    assert demo._queue.default_concurrency_limit == 1


def test_launch_refuses_a_missing_model_before_serving(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        launch(str(tmp_path / "no-such-model"), port=free_port())


def test_the_vision_head_is_offered_only_with_a_trained_one(pipe):
    from mmgen.drafting import VisionDraftHead

    assert drafter_choices(pipe) == ["off", "ngram"]
    with_head = tiny_random_pipeline()
    with_head.drafter = VisionDraftHead(hidden_size=with_head.backbone.config.hidden_size, num_heads=4,
                                        intermediate_size=32)
    assert drafter_choices(with_head) == ["off", "ngram", "vision-head"]


def test_compression_choices_are_the_ones_the_model_supports(pipe):
    choices = compression_choices(pipe)
    assert {"none", "pool:2", "pool:4"} <= set(choices)  # a 4×4 token grid pools by 2 and by 4
    for name in choices:
        assert pipe.model.compressor.num_tokens(name) >= 1


# -- the conversation and the upload checks -----------------------------------------------------------
def shape_picture(folder: Path, name: str, color: str) -> Path:
    path = folder / name
    PIL.Image.new("RGB", (16, 16), color).save(path)
    return path


def test_next_prompt_holds_every_earlier_turn_in_order_with_training_spacing(pipe, upload_dir, monkeypatch):
    asked = shape_picture(upload_dir, "asked.png", "red")
    drawn = shape_picture(upload_dir, "drawn.png", "blue")
    history = [  # as Gradio hands the chat back: normalised items
        {"role": "user", "content": [{"type": "file", "file": {"path": str(asked)}},
                                     {"type": "text", "text": "what color is it?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "red. here it is in blue:"},
                                          {"type": "file", "file": {"path": str(drawn)}}]},
    ]
    prompts = []
    original = pipe.stream
    monkeypatch.setattr(pipe, "stream", lambda prompt, **kw: prompts.append(prompt) or original(prompt, **kw))

    *_, (chat, _) = respond(pipe, threading.Lock(), {"text": "now make it green.", "files": []}, history,
                            *controls())

    prompt = prompts[0]
    assert [type(s) for s in prompt] == [Image, Text, Text, Image, Text]
    assert [s.text for s in prompt if isinstance(s, Text)] == [
        " what color is it?", " red. here it is in blue:", " now make it green."
    ]
    assert prompt[0].image.getpixel((0, 0)) == (255, 0, 0) and prompt[3].image.getpixel((0, 0)) == (0, 0, 255)
    assert chat[:2] == history and chat[2]["content"] == ["now make it green."]


def test_failed_turns_and_notes_are_left_out_of_the_next_prompt():
    history = [
        {"role": "user", "content": "draw a red circle."},
        {"role": "assistant", "content": "a red circle."},
        {"role": "user", "content": "draw it with squash:3"},
        {"role": "assistant", "content": "unknown compression", "metadata": {"title": ERROR_TITLE}},
        {"role": "assistant", "content": "(empty)", "metadata": {"title": "ℹ️ Empty answer"}},
    ]
    assert spaced(history_segments(history)) == [Text("draw a red circle."), Text(" a red circle.")]


def test_paths_outside_the_upload_folder_are_never_opened(upload_dir, tmp_path):
    outside = shape_picture(tmp_path, "outside.png", "red")
    link = upload_dir / "link.png"
    link.symlink_to(outside)
    for path in (outside, link, upload_dir / ".." / "outside.png"):
        with pytest.raises(UploadRejected, match="not an uploaded file"):
            open_image(path)
    assert open_image(shape_picture(upload_dir, "inside.png", "red")).size == (16, 16)
    assert all(open_image(e.image_path).size == (64, 64) for e in EXAMPLES if e.image)


def test_images_are_checked_by_size_content_and_declared_pixels(upload_dir):
    for side in (5_000, 100_000):  # under and over PIL's own bomb threshold
        (upload_dir / "bomb.png").write_bytes(png_declaring(side, side))
        with pytest.raises(UploadRejected, match="pixel limit"):
            open_image(upload_dir / "bomb.png")
    (upload_dir / "text.jpg").write_text("hello")
    with pytest.raises(UploadRejected, match="not a readable JPEG"):
        open_image(upload_dir / "text.jpg")
    big = shape_picture(upload_dir, "big.png", "red")
    with pytest.raises(UploadRejected, match="upload limit"):
        open_image(big, max_bytes=10)
    PIL.Image.new("P", (8, 8), 3).save(upload_dir / "palette.gif")
    assert open_image(upload_dir / "palette.gif").mode == "RGB"


def test_empty_message_changes_nothing(pipe):
    history = [{"role": "user", "content": "hi"}]
    outputs = list(respond(pipe, threading.Lock(), {"text": "  ", "files": []}, history, *controls()))
    assert outputs[-1][0] == history


def test_stats_line_reports_tau_only_when_drafting():
    stats = GenerationStats(text_tokens=30, target_forwards=12, images=2, seconds=3.0, image_seconds=1.0,
                            tokens_per_context_image=16)
    assert stats_line(stats, drafting=False) == (
        "**15.0** text tokens/s · **0.50** s per image · **16** tokens per context image"
    )
    assert "τ **2.50**" in stats_line(stats, drafting=True)


def test_examples_cover_a_story_a_question_about_an_image_and_an_edit():
    assert [e.task for e in EXAMPLES] == ["story", "i2t", "edit"]
    for example in EXAMPLES:
        if example.image:
            with PIL.Image.open(example.image_path) as image:
                assert image.format == "PNG" and image.size == (64, 64)
            assert os.path.getsize(example.image_path) < 10_000
