"""A multimodal judge behind any OpenAI-compatible `/v1/chat/completions` endpoint (a local vLLM, say).

The judge sees the query and the model's output as one user message of text and `image_url` parts
(images inline as base64 PNG data URLs), with a rubric as the system prompt, and answers with one JSON
object of integer scores. Rubrics:

- `interleaved_eval`: InterleavedEval's five aspects (Liu et al., 2024), each scored 0-5.
- `opening`: OpenING's seven criteria (Zhou et al., 2025), each scored 0-10 as in its scoring prompt.
- `llm_i_rubric(criteria)`: LLM-I's per-sample criteria r1..rN, each 0 (not met), 1 (partly) or 2 (met).

Endpoint failures never stop an evaluation: HTTP 5xx/429, timeouts, refused connections and answers
that do not parse are retried with exponential backoff, and a sample that still fails gets an
`{"error": ...}` record instead of an exception.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import logging
import math
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import PIL.Image

from mmgen.segments import Image, Segment, Text

from .format import EvalSample

logger = logging.getLogger(__name__)

__all__ = [
    "INTERLEAVED_EVAL",
    "OPENING",
    "RUBRICS",
    "JudgeClient",
    "JudgeParseError",
    "JudgeScorer",
    "Rubric",
    "get_rubric",
    "llm_i_rubric",
    "rubric_from_sample_criteria",
]


class JudgeParseError(ValueError):
    """The judge's answer is not a JSON object with a valid score for every criterion."""


@dataclass(frozen=True)
class Rubric:
    """Criteria the judge scores, each an integer in `[min_score, max_score]`."""

    name: str
    intro: str
    criteria: dict[str, str]
    min_score: int
    max_score: int
    scale: str
    uses_reference: bool = False

    def __post_init__(self):
        if not self.criteria:
            raise ValueError(f"rubric {self.name!r} needs at least one criterion")
        if self.min_score >= self.max_score:
            raise ValueError(f"rubric {self.name!r}: min_score must be below max_score")

    def system_prompt(self) -> str:
        """The instructions the judge gets as its system message."""
        lines = [self.intro.strip(), "", "Criteria:"]
        lines += [f"- {key}: {text}" for key, text in self.criteria.items()]
        lines += [
            "",
            f"Score each criterion with an integer from {self.min_score} to {self.max_score}:",
            self.scale.strip(),
        ]
        example = {key: {"score": self.min_score, "justification": "..."} for key in self.criteria}
        lines += [
            "",
            "Answer with exactly one JSON object and nothing else, with one entry per criterion, in this form:",
            json.dumps(example, indent=1),
        ]
        return "\n".join(lines)

    def parse(self, content: str) -> tuple[dict[str, int], dict[str, str]]:
        """Scores and justifications from the judge's answer; `JudgeParseError` if anything is off."""
        if not isinstance(content, str):
            raise JudgeParseError(f"judge answer must be text, got {type(content).__name__}")
        start, end = content.find("{"), content.rfind("}")
        if start < 0 or end <= start:
            raise JudgeParseError(f"no JSON object in judge answer: {content[:200]!r}")
        try:
            data = json.loads(content[start : end + 1])
        except json.JSONDecodeError as e:
            raise JudgeParseError(f"judge answer is not valid JSON ({e}): {content[:200]!r}") from e
        if isinstance(data, dict) and isinstance(data.get("scores"), dict):
            data = data["scores"]
        if not isinstance(data, dict):
            raise JudgeParseError("judge answer must be a JSON object")
        scores: dict[str, int] = {}
        notes: dict[str, str] = {}
        for key in self.criteria:
            if key not in data:
                raise JudgeParseError(f"judge answer has no score for {key!r}")
            entry = data[key]
            value = entry.get("score", entry.get("Score")) if isinstance(entry, dict) else entry
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise JudgeParseError(f"score for {key!r} must be an integer, got {value!r}")
            if value != int(value):
                raise JudgeParseError(f"score for {key!r} must be an integer, got {value!r}")
            if not self.min_score <= value <= self.max_score:
                raise JudgeParseError(
                    f"score for {key!r} is {value}, outside {self.min_score}..{self.max_score}"
                )
            scores[key] = int(value)
            if isinstance(entry, dict):
                notes[key] = str(entry.get("justification", entry.get("Justification", "")))
        return scores, notes


INTERLEAVED_EVAL = Rubric(
    name="interleaved_eval",
    intro=(
        "You are an expert judge of interleaved text-and-image generation. After INPUT you get a user's "
        "instruction, possibly with images; after OUTPUT you get a model's answer, a sequence of text and "
        "images. Judge the OUTPUT on each criterion below, independently of the others."
    ),
    criteria={
        "text_quality": "Is the generated text clear, fluent, coherent and informative, and does it follow the instruction?",
        "perceptual_quality": "Do the generated images look natural or well made, free of distortions, artifacts and implausible details?",
        "image_coherence": "Are the images consistent with each other and with the input images in style, entities and setting?",
        "text_image_coherence": "Does each image depict what the text next to it says, so that text and images support each other?",
        "helpfulness": "Does the output as a whole accomplish the instruction and give the user what they asked for?",
    },
    min_score=0,
    max_score=5,
    scale=(
        "0 = cannot be judged because the needed content is missing (e.g. no image at all);\n"
        "1 = very poor; 2 = poor; 3 = fair; 4 = good; 5 = excellent."
    ),
)

OPENING = Rubric(
    name="opening",
    intro=(
        "You are an expert in evaluating multimodal content. After INPUT you get a question or instruction "
        "asking for interleaved images and text, possibly with images; after OUTPUT you get the model's "
        "interleaved answer. Criteria are listed from most to least important."
    ),
    criteria={
        "Correctness": "Accuracy and validity with respect to the input: logic and facts of the text, plausibility and faithfulness of the images, and whether both are present.",
        "Image-Text Coherency": "How well each image reflects and complements the text it accompanies.",
        "Multi-step Consistency": "Consistency across steps, above all style and entity consistency across images, and coherence of the text steps.",
        "Content Quality": "Clarity and realism of the images first, then grammar and correctness of the text.",
        "Human Preference Alignment": "Absence of undesirable content in the text first, then the aesthetic appeal of the images.",
        "Completeness": "Whether every expected step or part of the answer is there, with nothing left out.",
        "Content Richness": "Variety of the images first, then how detailed the text is without losing meaning.",
    },
    min_score=0,
    max_score=10,
    scale="0-2 = major deficiencies; 3-5 = minor issues; 6-8 = good, small improvements possible; 9-10 = exemplary.",
)

RUBRICS: dict[str, Rubric] = {r.name: r for r in (INTERLEAVED_EVAL, OPENING)}


def llm_i_rubric(criteria: Sequence[str]) -> Rubric:
    """LLM-I's rubric for one sample: its own criteria r1..rN, each scored 0, 1 or 2."""
    if not criteria or not all(isinstance(c, str) and c.strip() for c in criteria):
        raise ValueError("LLM-I rubric needs a non-empty list of criterion texts")
    return Rubric(
        name="llm_i",
        intro=(
            "You are an expert evaluator of AI-generated reports made of text and images. After INPUT you get "
            "the task, after OUTPUT the generated report. Judge the report against each criterion on its own."
        ),
        criteria={f"r{i}": c.strip() for i, c in enumerate(criteria, 1)},
        min_score=0,
        max_score=2,
        scale="0 = not met; 1 = partially met; 2 = fully met or exceeded.",
    )


def rubric_from_sample_criteria(sample: EvalSample) -> Rubric:
    """The per-sample LLM-I rubric from `sample.meta["criteria"]` (set by the LLM-I adapter)."""
    criteria = sample.meta.get("criteria")
    if not criteria:
        raise ValueError(
            f"sample {sample.id!r} has no criteria in meta; the per-sample rubric needs LLM-I data"
        )
    return llm_i_rubric(criteria)


def get_rubric(name: str) -> Rubric | Callable[[EvalSample], Rubric]:
    """A rubric by name: `interleaved_eval`, `opening`, or `llm_i` (per-sample criteria)."""
    key = name.lower().replace("-", "_")
    if key == "llm_i":
        return rubric_from_sample_criteria
    if key not in RUBRICS:
        raise ValueError(f"unknown rubric {name!r}; known rubrics: {', '.join(sorted([*RUBRICS, 'llm_i']))}")
    return RUBRICS[key]


# ----------------------------------------------------------------------------------------------
# the HTTP client


class _Retryable(Exception):
    """An endpoint failure worth another attempt."""


def _data_url(image: PIL.Image.Image, max_side: int) -> str:
    image = image.convert("RGB")
    if max(image.size) > max_side:
        scale = max_side / max(image.size)
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


@dataclass
class JudgeClient:
    """Client for an OpenAI-compatible chat endpoint, using only the standard library.

    `url` may be the server root (`http://127.0.0.1:8000`), its `/v1`, or the full
    `/v1/chat/completions` path. Attempt k (k >= 1) waits `backoff * 2**(k-1)` seconds before retrying.
    """

    url: str
    model: str
    api_key: str | None = field(default=None, repr=False)
    timeout: float = 120.0
    max_retries: int = 3
    backoff: float = 2.0
    temperature: float = 0.0
    max_tokens: int = 1024
    max_image_side: int = 512

    def __post_init__(self):
        if not isinstance(self.url, str) or not self.url.startswith(("http://", "https://")):
            raise ValueError(f"judge url must start with http:// or https://, got {self.url!r}")
        if not isinstance(self.model, str) or not self.model:
            raise ValueError("judge model name must be a non-empty string")
        if not self.timeout > 0:
            raise ValueError(f"timeout must be positive, got {self.timeout!r}")
        if not isinstance(self.max_retries, int) or self.max_retries < 0:
            raise ValueError(f"max_retries must be a non-negative int, got {self.max_retries!r}")

    @property
    def endpoint(self) -> str:
        url = self.url.rstrip("/")
        if url.endswith("/chat/completions"):
            return url
        if url.endswith("/v1"):
            return url + "/chat/completions"
        return url + "/v1/chat/completions"

    def content_parts(self, segments: Sequence[Segment], first_image: int = 1) -> list[dict[str, Any]]:
        """Segments as chat content parts; each image is labelled `[image k]` so the judge can refer to it."""
        parts: list[dict[str, Any]] = []
        k = first_image
        for seg in segments:
            if isinstance(seg, Text):
                if seg.text.strip():
                    parts.append({"type": "text", "text": seg.text})
            elif isinstance(seg, Image):
                if seg.image is None:
                    raise ValueError("the judge needs pixel images; decode latent-only images first")
                parts.append({"type": "text", "text": f"[image {k}]"})
                parts.append(
                    {"type": "image_url", "image_url": {"url": _data_url(seg.image, self.max_image_side)}}
                )
                k += 1
        return parts

    def messages(
        self,
        query: Sequence[Segment],
        output: Sequence[Segment],
        rubric: Rubric,
        golden: Sequence[Segment] | None = None,
    ) -> list[dict[str, Any]]:
        """The chat messages for judging one output."""
        n_query_images = sum(isinstance(s, Image) for s in query)
        content = [{"type": "text", "text": "INPUT:"}, *self.content_parts(query)]
        content += [{"type": "text", "text": "OUTPUT:"}, *self.content_parts(output, n_query_images + 1)]
        if not any(isinstance(s, Image) for s in output) and not any(
            isinstance(s, Text) and s.text.strip() for s in output
        ):
            content.append({"type": "text", "text": "(the output is empty)"})
        if rubric.uses_reference and golden:
            n_before = n_query_images + sum(isinstance(s, Image) for s in output)
            content += [
                {"type": "text", "text": "REFERENCE ANSWER:"},
                *self.content_parts(golden, n_before + 1),
            ]
        content.append({"type": "text", "text": "Return only the JSON object."})
        return [{"role": "system", "content": rubric.system_prompt()}, {"role": "user", "content": content}]

    def chat(self, messages: list[dict[str, Any]]) -> str:
        """One request; returns the assistant's text. Raises `_Retryable` for failures worth retrying
        and `RuntimeError` for those that are not (e.g. HTTP 400)."""
        body = json.dumps(
            {
                "model": self.model,
                "messages": messages,
                "temperature": self.temperature,
                "max_tokens": self.max_tokens,
            }
        ).encode("utf-8")
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.endpoint, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as e:
            detail = e.read()[:200].decode("utf-8", "replace")
            if e.code in (408, 429) or e.code >= 500:
                raise _Retryable(f"HTTP {e.code}: {detail}") from e
            raise RuntimeError(f"HTTP {e.code}: {detail}") from e
        except TimeoutError as e:
            raise _Retryable(f"timed out after {self.timeout}s") from e
        except urllib.error.URLError as e:
            if isinstance(e.reason, TimeoutError):
                raise _Retryable(f"timed out after {self.timeout}s") from e
            raise _Retryable(f"cannot reach {self.endpoint}: {e.reason}") from e
        except (OSError, http.client.HTTPException) as e:
            raise _Retryable(f"connection failed: {type(e).__name__}: {e}") from e
        try:
            data = json.loads(raw)
            content = data["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError) as e:
            raise _Retryable(f"malformed response: {raw[:200]!r}") from e
        if not isinstance(content, str):
            raise _Retryable(f"response content is not text: {content!r}")
        return content

    def judge(
        self,
        query: Sequence[Segment],
        output: Sequence[Segment],
        rubric: Rubric,
        golden: Sequence[Segment] | None = None,
    ) -> dict[str, Any]:
        """Score one output. Returns `{"scores", "justifications", "attempts"}`, or `{"error", "attempts"}`
        when the endpoint keeps failing; never raises for endpoint problems."""
        try:
            messages = self.messages(query, output, rubric, golden)
        except (ValueError, TypeError) as e:
            return {"error": f"cannot build judge request: {e}", "attempts": 0}
        last_error = ""
        for attempt in range(1, self.max_retries + 2):
            if attempt > 1:
                time.sleep(self.backoff * 2 ** (attempt - 2))
            try:
                scores, notes = rubric.parse(self.chat(messages))
                return {"scores": scores, "justifications": notes, "attempts": attempt}
            except (_Retryable, JudgeParseError) as e:
                last_error = str(e)
                logger.warning("judge attempt %d/%d failed: %s", attempt, self.max_retries + 1, last_error)
            except RuntimeError as e:
                return {"error": str(e), "attempts": attempt}
        return {
            "error": f"gave up after {self.max_retries + 1} attempts: {last_error}",
            "attempts": self.max_retries + 1,
        }


@dataclass
class JudgeScorer:
    """Runner scorer: judges each output with one rubric (or a per-sample rubric function such as
    `rubric_from_sample_criteria`) and reports `judge.<rubric>.<criterion>` scores and their mean,
    or `judge.<rubric>.error`."""

    client: JudgeClient
    rubric: Rubric | Callable[[EvalSample], Rubric]
    name: str = "judge"

    def __call__(self, sample: EvalSample, output: list[Segment]) -> dict[str, Any]:
        rubric = self.rubric if isinstance(self.rubric, Rubric) else self.rubric(sample)
        prefix = f"judge.{rubric.name}"
        verdict = self.client.judge(sample.query, output, rubric, sample.golden)
        if "error" in verdict:
            return {f"{prefix}.error": verdict["error"]}
        scores = verdict["scores"]
        out: dict[str, Any] = {f"{prefix}.{key}": value for key, value in scores.items()}
        out[f"{prefix}.mean"] = sum(scores.values()) / len(scores)
        out[f"{prefix}.justifications"] = verdict["justifications"]
        return out
