"""Adapters between public interleaved benchmarks and the common `EvalSample` / `Prediction` format.

Each adapter reads the benchmark's data file, writes model outputs in the layout the benchmark's own
scoring scripts read, and reads such outputs back:

| name | data file | predictions written to `out_dir` |
|---|---|---|
| `isg` | ISG-Bench jsonl: `id`, `Category`, `Query`/`Golden` lists of `{type, content}` | `predictions.jsonl`: the source rows plus `output` |
| `opening` | OpenING jsonl/json: `total_uid`, `conversations` of `input`/`output` lists of `{text, image}` | one `<total_uid>.json` per sample, images `<total_uid>-o-<k>.png` beside it |
| `mmie` | MMIE json list: `id`, `question`, `answer`, `gt_answer` lists of `{text, image}` | `data.json` plus `images/`, self-contained as MMIE's scorer expects |
| `llm-i` | LLM-I json list: `prompt` (with `<image>` slots), `images`, criteria `r1..rN` | `predictions.json`: the source rows plus `answer` and `answer_images` |
| `placeholder` | json/jsonl: `id`, `prompt` with `<image>`, `<IMAGE>` or `![](IMG#n)`, `images` | `predictions.jsonl`: `id`, `output` text with placeholders, `output_images` |

Image paths in a data file are resolved against `images_dir`, or the data file's folder if not given.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import PIL.Image

from mmgen.segments import Image, Segment, Text

from .format import (
    EvalSample,
    Prediction,
    load_image,
    safe_name,
    save_png,
    segments_from_json,
    segments_to_json,
)

logger = logging.getLogger(__name__)

__all__ = [
    "ADAPTERS",
    "BenchmarkAdapter",
    "ISGAdapter",
    "LLMIAdapter",
    "MMIEAdapter",
    "OpeningAdapter",
    "PlaceholderAdapter",
    "get_adapter",
    "parse_placeholders",
    "render_placeholders",
]


# ----------------------------------------------------------------------------------------------
# shared helpers


def _read_records(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of a `.jsonl` file, or of a `.json` file holding a list (or one object)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"data file not found: {path}")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not valid UTF-8 (byte {e.start})") from None
    if path.suffix == ".jsonl":
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON: {e}") from e
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON: {e}") from e
        rows = data if isinstance(data, list) else [data]
    for n, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ValueError(f"{path}: record {n} must be a JSON object, got {type(row).__name__}")
    return rows


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, ensure_ascii=False, indent=2), encoding="utf-8")


def _write_jsonl(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def _base_dir(path: str | os.PathLike, images_dir: str | os.PathLike | None) -> Path:
    return Path(images_dir) if images_dir is not None else Path(path).parent


def _require(row: dict[str, Any], key: str, where: str) -> Any:
    if key not in row:
        raise ValueError(f"{where}: missing required field {key!r}")
    return row[key]


def _check_unique(samples: Sequence[EvalSample], where: str) -> None:
    seen: set[str] = set()
    for s in samples:
        if s.id in seen:
            raise ValueError(f"{where}: duplicate sample id {s.id!r}")
        seen.add(s.id)


def _pair_up(
    samples: Sequence[EvalSample], predictions: Sequence[Prediction]
) -> list[tuple[EvalSample, Prediction]]:
    """Pairs of (sample, prediction) in sample order; predictions for unknown ids are an error."""
    by_id = {s.id: s for s in samples}
    pairs = []
    seen: set[str] = set()
    for p in predictions:
        if not isinstance(p, Prediction):
            raise TypeError(f"predictions must be Prediction objects, got {type(p).__name__}")
        if p.id not in by_id:
            raise ValueError(f"prediction for unknown sample id {p.id!r}")
        if p.id in seen:
            raise ValueError(f"two predictions for sample id {p.id!r}")
        seen.add(p.id)
    order = {s.id: i for i, s in enumerate(samples)}
    for p in sorted(predictions, key=lambda p: order[p.id]):
        pairs.append((by_id[p.id], p))
    return pairs


def _placeholder_rows(samples: Sequence[EvalSample], predictions: Sequence[Prediction], out_dir: Path, style: str,
                      key: str, suffix: str, keep_raw: bool = False) -> list[dict[str, Any]]:
    """Rows `{id, key: text with placeholders, key_images: paths}` for predictions whose images are saved as
    PNGs under out_dir/images (named by sample id, `suffix` and index), in sample order. With `keep_raw`
    each row starts from the benchmark's own record of the sample, so its other fields survive."""
    rows = []
    for sample, pred in _pair_up(samples, predictions):
        text, images = render_placeholders(pred.output, style)
        names = [f"images/{safe_name(sample.id)}{suffix}{k}.png" for k in range(len(images))]
        for image, name in zip(images, names):
            save_png(image, out_dir / name)
        raw = dict(sample.meta.get("raw") or {}) if keep_raw else {}
        rows.append({**raw, "id": sample.id, key: text, f"{key}_images": names})
    return rows


def _read_placeholder_rows(out_dir: Path, file_name: str, key: str, unit: str) -> list[Prediction]:
    """Predictions back from rows written by `_placeholder_rows`."""
    preds = []
    for n, row in enumerate(_read_records(out_dir / file_name)):
        sample_id = str(_require(row, "id", f"{file_name} {unit} {n}"))
        images = [load_image(p, out_dir, sample_id) for p in row.get(f"{key}_images") or []]
        preds.append(Prediction(sample_id, parse_placeholders(row.get(key) or "", images, sample_id, "error")))
    return preds


_IMAGE_SLOT = "<image>"


def _pairs_to_segments(
    items: Any,
    base_dir: str | os.PathLike | None,
    sample_id: str,
    what: str,
    strip_markers: Sequence[str] = (),
) -> list[Segment]:
    """`[{text, image}]` items (OpenING, MMIE) to segments.

    An item may carry a text, an image, or both; with both, the image goes where the text's `<image>`
    slot is, or after the text if it has none. Texts are stripped, and empty texts dropped.
    """
    if isinstance(items, str):  # MMIE allows a bare string answer
        items = [{"text": items, "image": None}]
    if not isinstance(items, list):
        raise ValueError(
            f"sample {sample_id!r}: {what} must be a list of {{text, image}} items, got {type(items).__name__}"
        )
    out: list[Segment] = []

    def add_text(t: str) -> None:
        t = t.replace(_IMAGE_SLOT, "")
        for marker in strip_markers:
            t = re.sub(rf"\s*{re.escape(marker)}\s*", " ", t)
        t = t.strip()
        if t:
            out.append(Text(t))

    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise ValueError(
                f"sample {sample_id!r}: {what}[{i}] must be a dict with 'text'/'image', got {item!r}"
            )
        text, image = item.get("text"), item.get("image")
        if text is not None and not isinstance(text, str):
            raise ValueError(f"sample {sample_id!r}: {what}[{i}].text must be a string or null")
        if image is not None and not isinstance(image, str):
            raise ValueError(f"sample {sample_id!r}: {what}[{i}].image must be a path string or null")
        text = text or ""
        if image is None:
            add_text(text)
            continue
        before, _, after = text.partition(_IMAGE_SLOT)
        add_text(before)
        out.append(Image(load_image(image, base_dir, sample_id)))
        add_text(after)
    return out


def _segments_to_pairs(
    segments: Sequence[Segment], out_dir: Path, image_name: Any
) -> list[dict[str, str | None]]:
    """Segments to `[{text, image}]` items: a text followed by an image shares one item.

    `image_name(k)` gives the path (relative to `out_dir`) of the k-th image, saved there as PNG.
    """
    items: list[dict[str, str | None]] = []
    pending: str | None = None
    k = 0
    for seg in segments:
        if isinstance(seg, Text):
            if pending is not None:
                items.append({"text": pending, "image": None})
            pending = seg.text
        else:
            if seg.image is None:
                raise ValueError("Image segment holds only a latent; decode it to pixels before saving")
            rel = image_name(k)
            save_png(seg.image, out_dir / rel)
            items.append({"text": pending if pending is not None else "", "image": rel})
            pending = None
            k += 1
    if pending is not None:
        items.append({"text": pending, "image": None})
    return items


# ----------------------------------------------------------------------------------------------
# placeholder text


# `<image>` / `<IMAGE>` take the next image in order; `![alt](IMG#n)` names image n (1-based).
_PLACEHOLDER = re.compile(r"<image>|<IMAGE>|!\[[^\]]*\]\(IMG#(\d+)\)")
PLACEHOLDER_STYLES = ("<image>", "<IMAGE>", "markdown")


def parse_placeholders(
    text: str,
    images: Sequence[PIL.Image.Image],
    sample_id: str = "?",
    unused: str = "append",
) -> list[Segment]:
    """Split text with image placeholders into segments, filling the slots from `images`.

    `<image>` and `<IMAGE>` consume images in order; `![](IMG#n)` refers to the n-th image (1-based).
    Images no placeholder refers to are appended at the end (`unused="append"`) or refused
    (`unused="error"`). Text between placeholders is kept verbatim; empty pieces are dropped.
    """
    if not isinstance(text, str):
        raise TypeError(f"sample {sample_id!r}: prompt must be a string, got {type(text).__name__}")
    if unused not in ("append", "error"):
        raise ValueError(f"unused must be 'append' or 'error', got {unused!r}")
    out: list[Segment] = []
    used: set[int] = set()
    next_index = 0
    pos = 0
    for m in _PLACEHOLDER.finditer(text):
        if m.start() > pos:
            out.append(Text(text[pos : m.start()]))
        if m.group(1) is not None:
            n = int(m.group(1))
            if n < 1:
                raise ValueError(
                    f"sample {sample_id!r}: placeholder {m.group(0)!r} is 1-based; IMG#0 does not exist"
                )
            index = n - 1
        else:
            index = next_index
            next_index += 1
        if index >= len(images):
            raise ValueError(
                f"sample {sample_id!r}: placeholder {m.group(0)!r} refers to image {index + 1} "
                f"but only {len(images)} image(s) were given"
            )
        out.append(Image(images[index]))
        used.add(index)
        pos = m.end()
    if pos < len(text):
        out.append(Text(text[pos:]))
    left = [i for i in range(len(images)) if i not in used]
    if left:
        if unused == "error":
            raise ValueError(
                f"sample {sample_id!r}: image(s) {[i + 1 for i in left]} have no placeholder in the text"
            )
        out.extend(Image(images[i]) for i in left)
    return out


def render_placeholders(
    segments: Sequence[Segment], style: str = "<image>"
) -> tuple[str, list[PIL.Image.Image]]:
    """Inverse of `parse_placeholders`: the text with one placeholder per image, and the images in order.

    `style` is `"<image>"`, `"<IMAGE>"` or `"markdown"` (`![](IMG#n)`, 1-based).
    """
    if style not in PLACEHOLDER_STYLES:
        raise ValueError(f"unknown placeholder style {style!r}; expected one of {PLACEHOLDER_STYLES}")
    parts: list[str] = []
    images: list[PIL.Image.Image] = []
    for seg in segments:
        if isinstance(seg, Text):
            parts.append(seg.text)
        else:
            if seg.image is None:
                raise ValueError("Image segment holds only a latent; decode it to pixels before saving")
            images.append(seg.image)
            parts.append(f"![](IMG#{len(images)})" if style == "markdown" else style)
    return "".join(parts), images


# ----------------------------------------------------------------------------------------------
# adapters


class BenchmarkAdapter:
    """Reads a benchmark into `EvalSample`s and writes/reads predictions in its own layout."""

    name: str = ""

    def read(
        self, path: str | os.PathLike, images_dir: str | os.PathLike | None = None, limit: int | None = None
    ) -> list[EvalSample]:
        """Read the benchmark's data file (images resolved against `images_dir` or the file's folder)."""
        if limit is not None and (not isinstance(limit, int) or limit < 0):
            raise ValueError(f"limit must be a non-negative int or None, got {limit!r}")
        base = _base_dir(path, images_dir)
        rows = _read_records(path)
        samples = []
        for index, row in enumerate(rows):
            if limit is not None and len(samples) >= limit:
                break
            samples.append(self._sample(row, index, base, f"{path} record {index}"))
        _check_unique(samples, str(path))
        logger.info("read %d %s samples from %s", len(samples), self.name, path)
        return samples

    def _sample(self, row: dict[str, Any], index: int, base: Path, where: str) -> EvalSample:
        raise NotImplementedError

    def write_predictions(
        self, samples: Sequence[EvalSample], predictions: Sequence[Prediction], out_dir: str | os.PathLike
    ) -> Path:
        """Write predictions in the benchmark's output layout under `out_dir`; returns the main file or folder."""
        raise NotImplementedError

    def read_predictions(self, out_dir: str | os.PathLike) -> list[Prediction]:
        """Read predictions written by `write_predictions` (or by another model in the same layout)."""
        raise NotImplementedError


class ISGAdapter(BenchmarkAdapter):
    """ISG-Bench (Chen et al., ICLR 2025): `Query` and `Golden` are lists of `{type, content}`."""

    name = "isg"
    file_name = "predictions.jsonl"

    def _sample(self, row: dict[str, Any], index: int, base: Path, where: str) -> EvalSample:
        sample_id = str(_require(row, "id", where))
        query = segments_from_json(_require(row, "Query", where), base, sample_id, "Query")
        golden = (
            segments_from_json(row["Golden"], base, sample_id, "Golden")
            if row.get("Golden") is not None
            else None
        )
        meta = {"category": row.get("Category"), "raw": copy.deepcopy(row)}
        return EvalSample(sample_id, query, golden, meta)

    def write_predictions(
        self, samples: Sequence[EvalSample], predictions: Sequence[Prediction], out_dir: str | os.PathLike
    ) -> Path:
        out_dir = Path(out_dir)
        rows = []
        for sample, pred in _pair_up(samples, predictions):
            raw = sample.meta.get("raw") or {"id": sample.id, "Category": sample.category}
            output = segments_to_json(pred.output, out_dir, f"images/{safe_name(sample.id)}_o")
            rows.append({**raw, "output": output})
        path = out_dir / self.file_name
        _write_jsonl(path, rows)
        return path

    def read_predictions(self, out_dir: str | os.PathLike) -> list[Prediction]:
        out_dir = Path(out_dir)
        rows = _read_records(out_dir / self.file_name)
        preds = []
        for n, row in enumerate(rows):
            sample_id = str(_require(row, "id", f"{self.file_name} row {n}"))
            preds.append(
                Prediction(
                    sample_id,
                    segments_from_json(_require(row, "output", sample_id), out_dir, sample_id, "output"),
                )
            )
        return preds


class OpeningAdapter(BenchmarkAdapter):
    """OpenING (Zhou et al., CVPR 2025): `conversations` of `input` and `output` turns, each a list of
    `{text, image}` items. The `<BEGIN>` marker of story inputs is dropped from the query text."""

    name = "opening"

    def _sample(self, row: dict[str, Any], index: int, base: Path, where: str) -> EvalSample:
        sample_id = str(_require(row, "total_uid", where))
        conversations = _require(row, "conversations", where)
        if not isinstance(conversations, list):
            raise ValueError(f"sample {sample_id!r}: conversations must be a list of turns")
        query: list[Segment] = []
        golden: list[Segment] = []
        for turn in conversations:
            if not isinstance(turn, dict):
                raise ValueError(f"sample {sample_id!r}: each conversation turn must be a dict")
            if "input" in turn:
                query += _pairs_to_segments(
                    turn["input"], base, sample_id, "input", strip_markers=("<BEGIN>",)
                )
            if "output" in turn:
                golden += _pairs_to_segments(turn["output"], base, sample_id, "output")
        category = row.get("subtask_name") or row.get("meta_task_name")
        meta = {"category": category, "raw": copy.deepcopy(row)}
        return EvalSample(sample_id, query, golden or None, meta)

    def write_predictions(
        self, samples: Sequence[EvalSample], predictions: Sequence[Prediction], out_dir: str | os.PathLike
    ) -> Path:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        for sample, pred in _pair_up(samples, predictions):
            raw = copy.deepcopy(sample.meta.get("raw") or {"total_uid": sample.id, "conversations": []})
            uid = safe_name(sample.id)
            inputs = [t for t in raw.get("conversations", []) if isinstance(t, dict) and "input" in t]
            output = _segments_to_pairs(pred.output, out_dir, lambda k, uid=uid: f"{uid}-o-{k}.png")
            raw["conversations"] = inputs + [{"output": output}]
            _write_json(out_dir / f"{uid}.json", raw)
        return out_dir

    def read_predictions(self, out_dir: str | os.PathLike) -> list[Prediction]:
        out_dir = Path(out_dir)
        preds = []
        for path in sorted(out_dir.glob("*.json")):
            try:
                row = json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: not valid JSON: {e}") from e
            if not isinstance(row, dict) or "conversations" not in row:
                continue  # not an OpenING output file (e.g. a summary written beside them)
            sample_id = str(row.get("total_uid", path.stem))
            output: list[Segment] = []
            for turn in row["conversations"]:
                if isinstance(turn, dict) and "output" in turn:
                    items = [_local_image(item, out_dir) for item in turn["output"]]
                    output += _pairs_to_segments(items, out_dir, sample_id, "output")
            preds.append(Prediction(sample_id, output))
        return preds


def _local_image(item: Any, out_dir: Path) -> Any:
    """OpenING's scorers look output images up by file name in the model's output folder, whatever
    folder the path names (some models write `./<model>_output/<name>`); do the same."""
    if isinstance(item, dict) and isinstance(item.get("image"), str):
        path = item["image"]
        if not (out_dir / path).is_file() and (out_dir / Path(path).name).is_file():
            return {**item, "image": Path(path).name}
    return item


_MMIE_CATEGORIES = ("MSR", "PBL", "SA")  # multi-step reasoning, project-based learning, situational analysis


class MMIEAdapter(BenchmarkAdapter):
    """MMIE (Xia et al., ICLR 2025): a JSON list of `{id, question, answer, gt_answer}` with lists of
    `{text, image}` items. Predictions go in `answer`; the written folder holds every image it refers
    to, since MMIE's scorer resolves image paths against the folder of `data.json`."""

    name = "mmie"
    file_name = "data.json"

    def __init__(self, model_name: str = "mmgen"):
        self.model_name = model_name

    def _sample(self, row: dict[str, Any], index: int, base: Path, where: str) -> EvalSample:
        sample_id = str(_require(row, "id", where))
        query = _pairs_to_segments(_require(row, "question", where), base, sample_id, "question")
        gt = row.get("gt_answer")
        golden = _pairs_to_segments(gt, base, sample_id, "gt_answer") if gt else None
        category = next((c for c in _MMIE_CATEGORIES if c in sample_id), None)
        meta = {
            "category": category,
            "raw": {k: v for k, v in row.items() if k not in ("question", "answer", "gt_answer")},
        }
        return EvalSample(sample_id, query, golden, meta)

    def write_predictions(
        self, samples: Sequence[EvalSample], predictions: Sequence[Prediction], out_dir: str | os.PathLike
    ) -> Path:
        out_dir = Path(out_dir)
        rows = []
        for sample, pred in _pair_up(samples, predictions):
            stem = f"images/{safe_name(sample.id)}"
            row = dict(sample.meta.get("raw") or {})
            row["id"] = sample.id
            row["question"] = _segments_to_pairs(sample.query, out_dir, lambda k, s=stem: f"{s}_q{k}.png")
            row["answer"] = _segments_to_pairs(pred.output, out_dir, lambda k, s=stem: f"{s}_a{k}.png")
            row["model"] = self.model_name
            golden = sample.golden or []
            row["gt_answer"] = _segments_to_pairs(golden, out_dir, lambda k, s=stem: f"{s}_g{k}.png") or [
                {"text": "", "image": None}
            ]
            rows.append(row)
        path = out_dir / self.file_name
        _write_json(path, rows)
        return path

    def read_predictions(self, out_dir: str | os.PathLike) -> list[Prediction]:
        out_dir = Path(out_dir)
        preds = []
        for n, row in enumerate(_read_records(out_dir / self.file_name)):
            sample_id = str(_require(row, "id", f"{self.file_name} record {n}"))
            preds.append(
                Prediction(
                    sample_id, _pairs_to_segments(row.get("answer") or [], out_dir, sample_id, "answer")
                )
            )
        return preds


_CRITERION_KEY = re.compile(r"r(\d+)")


class LLMIAdapter(BenchmarkAdapter):
    """LLM-I (Guo et al., 2025): `prompt` (with `<image>` slots for the input images), `images`, and
    per-sample rubric criteria `r1..rN`, kept in `meta["criteria"]` for the judge. Records without an
    `id` are numbered from 1 in file order, as LLM-I's own scripts number them."""

    name = "llm-i"
    file_name = "predictions.json"

    def _sample(self, row: dict[str, Any], index: int, base: Path, where: str) -> EvalSample:
        sample_id = str(row.get("id", index + 1))
        prompt = _require(row, "prompt", where)
        paths = row.get("images") or []
        if not isinstance(paths, list):
            raise ValueError(f"sample {sample_id!r}: images must be a list of paths")
        images = [load_image(p, base, sample_id) for p in paths]
        query = parse_placeholders(prompt, images, sample_id, unused="append")
        keys = sorted((int(m.group(1)), k) for k in row if (m := _CRITERION_KEY.fullmatch(k)))
        criteria = [str(row[k]) for _, k in keys]
        meta = {"category": row.get("category"), "criteria": criteria, "raw": copy.deepcopy(row)}
        return EvalSample(sample_id, query, None, meta)

    def write_predictions(
        self, samples: Sequence[EvalSample], predictions: Sequence[Prediction], out_dir: str | os.PathLike
    ) -> Path:
        rows = _placeholder_rows(samples, predictions, Path(out_dir), "<image>", "answer", "_a", keep_raw=True)
        path = Path(out_dir) / self.file_name
        _write_json(path, rows)
        return path

    def read_predictions(self, out_dir: str | os.PathLike) -> list[Prediction]:
        return _read_placeholder_rows(Path(out_dir), self.file_name, "answer", "record")


class PlaceholderAdapter(BenchmarkAdapter):
    """Benchmarks that put image placeholders in a prompt string: rows `{id, prompt, images}` with
    optional golden `answer` + `answer_images`. Predictions are written with the same placeholder style."""

    name = "placeholder"
    file_name = "predictions.jsonl"

    def __init__(self, style: str = "<image>"):
        if style not in PLACEHOLDER_STYLES:
            raise ValueError(f"unknown placeholder style {style!r}; expected one of {PLACEHOLDER_STYLES}")
        self.style = style

    def _sample(self, row: dict[str, Any], index: int, base: Path, where: str) -> EvalSample:
        sample_id = str(row.get("id", index))
        paths = row.get("images") or []
        if not isinstance(paths, list):
            raise ValueError(f"sample {sample_id!r}: images must be a list of paths")
        images = [load_image(p, base, sample_id) for p in paths]
        query = parse_placeholders(_require(row, "prompt", where), images, sample_id, unused="error")
        golden = None
        if row.get("answer") is not None:
            answer_images = [load_image(p, base, sample_id) for p in row.get("answer_images") or []]
            golden = parse_placeholders(row["answer"], answer_images, sample_id, unused="error")
        meta = {"category": row.get("category"), "raw": copy.deepcopy(row)}
        return EvalSample(sample_id, query, golden, meta)

    def write_predictions(
        self, samples: Sequence[EvalSample], predictions: Sequence[Prediction], out_dir: str | os.PathLike
    ) -> Path:
        path = Path(out_dir) / self.file_name
        _write_jsonl(path, _placeholder_rows(samples, predictions, Path(out_dir), self.style, "output", "_o"))
        return path

    def read_predictions(self, out_dir: str | os.PathLike) -> list[Prediction]:
        return _read_placeholder_rows(Path(out_dir), self.file_name, "output", "row")


ADAPTERS: dict[str, BenchmarkAdapter] = {
    "isg": ISGAdapter(),
    "opening": OpeningAdapter(),
    "mmie": MMIEAdapter(),
    "llm-i": LLMIAdapter(),
    "placeholder": PlaceholderAdapter(),
}


def get_adapter(name: str) -> BenchmarkAdapter:
    """The adapter registered under `name` (see `ADAPTERS`)."""
    if not isinstance(name, str):
        raise TypeError(f"adapter name must be a str, got {type(name).__name__}")
    try:
        return ADAPTERS[name.lower()]
    except KeyError:
        raise ValueError(
            f"unknown benchmark {name!r}; known benchmarks: {', '.join(sorted(ADAPTERS))}"
        ) from None
