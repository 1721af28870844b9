"""The judge client against a real OpenAI-compatible HTTP server on 127.0.0.1, started by the test."""

import base64
import io
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import PIL.Image
import pytest

from mmgen.evals.format import EvalSample
from mmgen.evals.judge import (
    INTERLEAVED_EVAL,
    OPENING,
    JudgeClient,
    JudgeParseError,
    JudgeScorer,
    get_rubric,
    llm_i_rubric,
    rubric_from_sample_criteria,
)
from mmgen.segments import Image, Text

GOOD = {k: {"score": 4, "justification": "fine"} for k in INTERLEAVED_EVAL.criteria}


class FakeJudge:
    """A scripted chat-completions server: each request pops the next behaviour
    ("ok", "500", "hang", "garbage", "bad-score", "400"); it records every request it got and any
    way the request differs from the OpenAI chat format."""

    def __init__(self, script, hang_seconds=2.0):
        self.script = list(script)
        self.requests = []
        self.problems = []
        self.hang_seconds = hang_seconds
        judge = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output quiet
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                judge.check(self.path, self.headers, body)
                behaviour = judge.script.pop(0) if judge.script else "ok"
                try:
                    judge.respond(self, behaviour)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up on a hanging request

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    def check(self, path, headers, body):
        if path != "/v1/chat/completions":
            self.problems.append(f"path {path}")
        if headers.get("Content-Type") != "application/json":
            self.problems.append("content type")
        try:
            data = json.loads(body)
        except ValueError:
            self.problems.append("body is not JSON")
            return
        self.requests.append(data)
        if data.get("model") != "judge-model":
            self.problems.append("model name")
        messages = data.get("messages")
        if not (isinstance(messages, list) and [m.get("role") for m in messages] == ["system", "user"]):
            self.problems.append("messages must be [system, user]")
            return
        if not isinstance(messages[0]["content"], str):
            self.problems.append("system content must be text")
        for part in messages[1]["content"]:
            if part.get("type") == "text":
                if not isinstance(part.get("text"), str):
                    self.problems.append("text part without text")
            elif part.get("type") == "image_url":
                url = part.get("image_url", {}).get("url", "")
                if not url.startswith("data:image/png;base64,"):
                    self.problems.append("image is not a base64 PNG data URL")
                    continue
                try:
                    PIL.Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).verify()
                except Exception:
                    self.problems.append("image data does not decode to a PNG")
            else:
                self.problems.append(f"unknown content part {part.get('type')}")

    def respond(self, handler, behaviour):
        if behaviour == "hang":
            time.sleep(self.hang_seconds)
        if behaviour in ("500", "400"):
            handler.send_response(int(behaviour))
            handler.end_headers()
            handler.wfile.write(b"server says no")
            return
        if behaviour == "garbage":
            content = "I think it is quite good overall!"
        elif behaviour == "bad-score":
            content = json.dumps({**GOOD, "helpfulness": {"score": 9, "justification": "off the scale"}})
        else:
            content = "```json\n" + json.dumps(GOOD) + "\n```"
        payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(payload)))
        handler.end_headers()
        handler.wfile.write(payload)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


QUERY = [Text("Draw a red circle, then describe it."), Image(PIL.Image.new("RGB", (20, 20), (200, 0, 0)))]
OUTPUT = [Text("Here it is:"), Image(PIL.Image.new("RGB", (20, 20), (255, 0, 0))), Text("A red circle.")]


def client(url, **kwargs):
    defaults = {"timeout": 0.5, "max_retries": 2, "backoff": 0.01}
    return JudgeClient(url=url, model="judge-model", **{**defaults, **kwargs})


def test_judge_sends_an_openai_chat_request_with_inline_images_and_parses_scores():
    with FakeJudge(["ok"]) as server:
        verdict = client(server.url).judge(QUERY, OUTPUT, INTERLEAVED_EVAL)
    assert server.problems == []
    assert verdict["scores"] == {k: 4 for k in INTERLEAVED_EVAL.criteria} and verdict["attempts"] == 1
    (request,) = server.requests
    parts = request["messages"][1]["content"]
    assert [p["type"] for p in parts].count("image_url") == 2  # the query's image and the output's
    assert "text_image_coherence" in request["messages"][0]["content"]


@pytest.mark.parametrize("failure", ["500", "hang", "garbage", "bad-score"])
def test_judge_retries_a_failed_attempt_and_then_succeeds(failure):
    with FakeJudge([failure, "ok"]) as server:
        verdict = client(server.url).judge(QUERY, OUTPUT, INTERLEAVED_EVAL)
    assert verdict["attempts"] == 2 and verdict["scores"]["helpfulness"] == 4
    assert len(server.requests) == 2 and server.problems == []


def test_judge_that_keeps_failing_gives_an_error_record_not_an_exception():
    with FakeJudge(["500", "hang", "garbage"]) as server:
        verdict = client(server.url, max_retries=2).judge(QUERY, OUTPUT, INTERLEAVED_EVAL)
    assert set(verdict) == {"error", "attempts"} and verdict["attempts"] == 3
    assert "gave up after 3 attempts" in verdict["error"] and "no JSON object" in verdict["error"]


def test_judge_does_not_retry_a_rejected_request():
    with FakeJudge(["400", "ok"]) as server:
        verdict = client(server.url).judge(QUERY, OUTPUT, INTERLEAVED_EVAL)
    assert verdict == {"error": "HTTP 400: server says no", "attempts": 1} and len(server.requests) == 1


def test_judge_records_an_unreachable_endpoint_as_an_error():
    with FakeJudge([]) as server:
        url = server.url
    verdict = client(url, max_retries=1).judge(QUERY, OUTPUT, INTERLEAVED_EVAL)
    assert verdict["attempts"] == 2 and "cannot reach" in verdict["error"]


def test_judge_scorer_flattens_scores_for_the_runner_and_keeps_errors_per_sample():
    sample = EvalSample("s1", QUERY)
    with FakeJudge(["ok", "500", "500", "500"]) as server:
        scorer = JudgeScorer(client(server.url), INTERLEAVED_EVAL)
        good, bad = scorer(sample, OUTPUT), scorer(sample, OUTPUT)
    assert (
        good["judge.interleaved_eval.perceptual_quality"] == 4 and good["judge.interleaved_eval.mean"] == 4.0
    )
    assert list(bad) == ["judge.interleaved_eval.error"] and "HTTP 500" in bad["judge.interleaved_eval.error"]


def test_rubric_parsing_validates_every_score():
    scores, notes = OPENING.parse(
        json.dumps({"scores": {k: {"Score": 7, "Justification": "ok"} for k in OPENING.criteria}})
    )
    assert set(scores.values()) == {7} and notes["Completeness"] == "ok"
    with pytest.raises(JudgeParseError, match="no score for 'helpfulness'"):
        INTERLEAVED_EVAL.parse(json.dumps({k: 3 for k in list(INTERLEAVED_EVAL.criteria)[:4]}))
    with pytest.raises(JudgeParseError, match="must be an integer"):
        INTERLEAVED_EVAL.parse(json.dumps({k: 2.5 for k in INTERLEAVED_EVAL.criteria}))
    with pytest.raises(JudgeParseError, match="outside 0..10"):
        OPENING.parse(json.dumps({k: 11 for k in OPENING.criteria}))


def test_llm_i_rubric_scores_each_sample_criterion_0_to_2():
    rubric = rubric_from_sample_criteria(
        EvalSample("x", [Text("q")], meta={"criteria": ["Shows an owl", "Cites a source"]})
    )
    assert list(rubric.criteria) == ["r1", "r2"] and (rubric.min_score, rubric.max_score) == (0, 2)
    assert "Cites a source" in rubric.system_prompt()
    assert get_rubric("llm-i") is rubric_from_sample_criteria and get_rubric("opening") is OPENING
    with pytest.raises(ValueError, match="known rubrics"):
        get_rubric("vibes")
    with pytest.raises(ValueError):
        llm_i_rubric([])


def test_client_rejects_bad_settings_and_normalises_the_endpoint():
    with pytest.raises(ValueError, match="http"):
        JudgeClient(url="127.0.0.1:8000", model="m")
    with pytest.raises(ValueError, match="model"):
        JudgeClient(url="http://x", model="")
    assert JudgeClient(url="http://h:1", model="m").endpoint == "http://h:1/v1/chat/completions"
    assert JudgeClient(url="http://h:1/v1/", model="m").endpoint == "http://h:1/v1/chat/completions"
    assert (
        JudgeClient(url="http://h/v1/chat/completions", model="m").endpoint == "http://h/v1/chat/completions"
    )
