"""The Gradio demo: a multi-turn chat whose answers stream in as interleaved text and images.

`launch()` loads a model once and serves it; `build_demo(pipe)` builds the page around any
`MMGenPipeline` (the tests use a tiny random one); `serve(demo, ...)` starts the server with the upload
limits. Generation runs through Gradio's queue with a concurrency limit.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from pathlib import Path

import gradio as gr

from mmgen.compression import METHODS
from mmgen.drafting import VisionDraftHead
from mmgen.pipelines import MMGenPipeline

from .chat import (
    DRAFTER_OFF,
    ERROR_TITLE,
    AnswerStream,
    GenerationSettings,
    chat_history,
    history_segments,
    image_folder,
    message_segments,
    spaced,
    stats_line,
    user_message,
)
from .example_prompts import EXAMPLES
from .uploads import IMAGE_EXTENSIONS, MAX_UPLOAD_BYTES, UploadRejected, open_image

logger = logging.getLogger(__name__)

CSS = """
#mmgen-chat .message-wrap img { width: 192px; height: 192px; object-fit: contain; image-rendering: pixelated; }
#mmgen-chat .example-image { image-rendering: pixelated; }
#mmgen-stats { min-height: 1.5em; }
"""
INTRO = (
    "## mmgen · interleaved text and image generation\n"
    "One model writes text and draws pictures in a single stream. Ask for a story in pictures, attach an "
    "image and ask about it, or ask for an edit. Earlier turns, with their images, stay in the context."
)


def drafter_choices(pipe: MMGenPipeline) -> list[str]:
    """Drafters offered in the UI; "off" decodes plainly. The vision head only when the model has a trained one
    (`mmgen train-drafter` adds it to a model folder)."""
    return [DRAFTER_OFF, "ngram"] + (["vision-head"] if isinstance(pipe.drafter, VisionDraftHead) else [])


def compression_choices(pipe: MMGenPipeline) -> list[str]:
    """Compression specs to offer: every known method at its example amount and twice that, kept if the
    loaded model's token grid supports it. Other specs can still be typed into the dropdown."""
    candidates = ["none"] + [f"{method}:{n}" for method, amount in METHODS.items() if amount
                             for n in (amount, 2 * amount)]
    choices = []
    for name in candidates:
        try:
            pipe.model.compressor.num_tokens(name)
        except ValueError:
            continue
        choices.append(name)
    return choices


def _user_message(message: dict) -> dict:
    """The user's turn (as `user_message` gives it) as shown in the chat: images first, then text, as the
    prompt reads it."""
    content: list = [{"path": path} for path in message["files"]]
    if message["text"].strip():
        content.append(message["text"])
    return {"role": "user", "content": content}


def _error_message(text: str) -> dict:
    return {"role": "assistant", "content": text, "metadata": {"title": ERROR_TITLE}}


def respond(pipe: MMGenPipeline, lock: threading.Lock, message: dict | None, history: list | None,
            *controls) -> Iterator[tuple[list, str]]:
    """The chat handler: append the user's turn, then stream the answer. Yields (chat, stats line).

    Bad uploads and bad settings come back as a warning and an error note in the chat; the note and the
    failed turn are left out of later prompts.
    """
    settings = GenerationSettings(*controls)
    valid: list = []  # what can be shown back: a malformed history is not
    try:
        history = valid = chat_history(history)
        message = user_message(message)
    except ValueError as err:
        gr.Warning(str(err))
        yield valid + [_error_message(str(err))], ""
        return
    if not message["text"].strip() and not message["files"]:
        gr.Info("Type a message or attach an image first.")
        yield history, gr.skip()
        return
    # Every yield stays inside the folder's lifetime: Gradio copies the images only when it receives them.
    with image_folder() as folder:
        yield from _answer(pipe, lock, message, history, settings, folder)


def _answer(pipe: MMGenPipeline, lock: threading.Lock, message: dict, history: list,
            settings: GenerationSettings, folder: Path) -> Iterator[tuple[list, str]]:
    shown = [_user_message(message)]
    answer = AnswerStream(pipe, lock)
    try:
        for path in message["files"]:
            open_image(path)  # reject a bad upload before the turn is shown with it
        yield history + shown, "*generating…*"
        prompt = spaced(history_segments(history) + message_segments(message))
        for content in answer.run(prompt, settings, folder):
            yield history + shown + [{"role": "assistant", "content": list(content)}], "*generating…*"
    except (ValueError, TypeError) as err:  # user-facing messages: bad uploads and bad settings
        logger.info("turn refused: %s", err)
        if isinstance(err, UploadRejected):
            shown = [{"role": "user", "content": message["text"] or "(an image)"}]
        gr.Warning(str(err))
        partial = [{"role": "assistant", "content": list(answer.content)}] if answer.content else []
        yield history + shown + partial + [_error_message(str(err))], ""
        return
    except Exception:
        logger.exception("generation failed")
        partial = [{"role": "assistant", "content": list(answer.content)}] if answer.content else []
        note = _error_message("generation failed with an internal error; see the server log")
        yield history + shown + partial + [note], ""
        return
    if answer.content:
        reply = {"role": "assistant", "content": list(answer.content)}
    else:
        reply = {"role": "assistant", "content": "(the model ended its answer at once)",
                 "metadata": {"title": "ℹ️ Empty answer"}}
    yield history + shown + [reply], stats_line(answer.stats, settings.drafting)


def build_demo(pipe: MMGenPipeline, concurrency_limit: int = 1, defaults: GenerationSettings | None = None
               ) -> gr.Blocks:
    """The demo page around `pipe`. Its API endpoint `/chat` takes the textbox value, the chat so far and
    the controls (in `GenerationSettings` order) and returns the chat and the stats line."""
    defaults = defaults or GenerationSettings()
    lock = threading.Lock()

    def chat(message, history, *controls):
        yield from respond(pipe, lock, message, history, *controls)

    with gr.Blocks(title="mmgen demo", analytics_enabled=False) as demo:
        gr.Markdown(INTRO)
        pending = gr.State(None)
        with gr.Row(equal_height=False):
            with gr.Column(scale=3):
                chatbot = gr.Chatbot(
                    label="Conversation", show_label=False, elem_id="mmgen-chat", height=620, layout="bubble",
                    examples=[
                        {"display_text": e.label, "text": e.text, **({"files": [str(e.image_path)]} if e.image else {})}
                        for e in EXAMPLES
                    ],
                    placeholder="Pick an example or write a message. Attach images with the clip.",
                    feedback_options=None, buttons=["copy"],
                )
                textbox = gr.MultimodalTextbox(
                    placeholder="Write a message; attach PNG, JPEG, WebP, GIF or BMP images (up to 10 MB)",
                    file_types=list(IMAGE_EXTENSIONS), file_count="multiple", sources=["upload"],
                    show_label=False, autofocus=True,
                )
                stats = gr.Markdown(elem_id="mmgen-stats")
            with gr.Column(scale=1, min_width=260):
                max_new_tokens = gr.Slider(1, 1024, value=defaults.max_new_tokens, step=1, precision=0,
                                           label="Max new text tokens")
                steps = gr.Slider(1, 100, value=defaults.num_inference_steps, step=1, precision=0,
                                  label="Image steps")
                guidance = gr.Slider(0.0, 10.0, value=defaults.guidance_scale, step=0.1, label="Text guidance")
                image_guidance = gr.Slider(0.0, 10.0, value=defaults.image_guidance_scale, step=0.1,
                                           label="Image guidance")
                seed = gr.Number(value=defaults.seed, precision=0, minimum=0, label="Seed")
                max_images = gr.Slider(0, 8, value=defaults.max_images, step=1, precision=0, label="Max images")
                compression = gr.Dropdown(
                    compression_choices(pipe), value=defaults.compression, allow_custom_value=True,
                    label="Context image compression", info="method or method:amount, e.g. pool:2",
                )
                drafter = gr.Dropdown(drafter_choices(pipe), value=defaults.drafter, label="Drafter")
                temperature = gr.Slider(0.0, 2.0, value=defaults.temperature, step=0.05,
                                        label="Temperature (0 = greedy)")
                clear = gr.ClearButton([chatbot, textbox, stats], value="New conversation")
        controls = [max_new_tokens, steps, guidance, image_guidance, seed, max_images, compression, drafter,
                    temperature]
        # The example files as Gradio copied them into its cache when the chatbot was built.
        example_messages = [
            {"text": e.text, "files": [f["path"] for f in card.get("files", [])]}
            for e, card in zip(EXAMPLES, chatbot.examples or [])
        ]

        # While an answer streams, the textbox is locked and its button stops the answer.
        def hold(message):
            return gr.MultimodalTextbox(value=None, interactive=False, submit_btn=False, stop_btn=True), message

        def pick_example(evt: gr.SelectData):
            return hold(example_messages[evt.index])

        def release():
            return gr.MultimodalTextbox(interactive=True, submit_btn=True, stop_btn=False)

        quiet = dict(queue=False, api_visibility="undocumented")
        answers = []
        for trigger in (
            textbox.submit(hold, [textbox], [textbox, pending], **quiet),
            chatbot.example_select(pick_example, None, [textbox, pending], **quiet),
        ):
            answer = trigger.then(chat, [pending, chatbot, *controls], [chatbot, stats],
                                  api_name="chat_in_page", api_visibility="undocumented")
            answer.then(release, None, [textbox], **quiet)
            answers.append(answer)
        textbox.stop(release, None, [textbox], cancels=answers, **quiet)
        clear.click(lambda: None, None, [pending], **quiet)
        # The same handler for API clients, in one call: textbox value and chat in, chat and stats out.
        api_button = gr.Button(visible=False)
        api_button.click(chat, [textbox, chatbot, *controls], [chatbot, stats], api_name="chat")
    demo.queue(default_concurrency_limit=concurrency_limit, max_size=64)
    return demo


def serve(demo: gr.Blocks, host: str = "127.0.0.1", port: int | None = 7860, share: bool = False,
          block: bool = True) -> gr.Blocks:
    """Start the server with the demo's upload limit. No extra folders are served (`allowed_paths` stays
    empty). With `block=False` it returns at once and `demo.close()` stops it.

    `show_error` passes Gradio's own refusals (a file that was not uploaded, a value out of a slider's
    range, a malformed chat) to API clients; the chat handler catches its own errors and words them."""
    demo.launch(
        server_name=host, server_port=port, share=share, prevent_thread_lock=not block,
        max_file_size=MAX_UPLOAD_BYTES, css=CSS, ssr_mode=False, quiet=not block, footer_links=["api"],
        show_error=True,
    )
    return demo


def launch(model: str | None = None, host: str = "127.0.0.1", port: int = 7860, share: bool = False,
           concurrency_limit: int = 1, dtype: str = "float32") -> None:
    """Load a model folder (default: the embedded default model) once and serve the demo until stopped."""
    logger.info("loading %s", model or "the embedded default model")
    pipe = MMGenPipeline.from_pretrained(model, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    serve(build_demo(pipe, concurrency_limit=concurrency_limit), host=host, port=port, share=share)
