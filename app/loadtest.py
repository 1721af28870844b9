"""A bounded load test of the demo: concurrent gradio_client clients chat with a server on 127.0.0.1.

    python -m mmgen.app.loadtest --clients 16 --seconds 60             # a tiny random pipeline
    python -m mmgen.app.loadtest --model default --seconds 60           # the embedded default model

The server runs in a process of its own, started here on a free port of 127.0.0.1 and stopped at the end,
so that its memory is measured alone: the resident set after the first answered request, and at the end.
Each client loops until the time is up, alternating a story prompt and a question about an uploaded
picture. A request fails if it raises, passes its timeout, or comes back with an error note instead of an
answer. The run passes with no failure and the end memory within `MAX_MEMORY_GROWTH` of the first.
"""

from __future__ import annotations

import argparse
import logging
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import PIL.Image
import psutil
from gradio_client import Client, handle_file

from .chat import ERROR_TITLE, GenerationSettings

logger = logging.getLogger(__name__)

HOST = "127.0.0.1"  # the load test never serves or calls anything else
MAX_MEMORY_GROWTH = 1.5
STORY = "a story in two pictures: a red circle. then the circle turns blue."
QUESTION = "describe the image."
# Small answers, so the test measures the server rather than the model.
SETTINGS = GenerationSettings(max_new_tokens=12, num_inference_steps=2, max_images=2)


@dataclass
class LoadReport:
    """What a run measured. Latencies are per request, queueing in the server included."""

    clients: int
    seconds: float
    latencies: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    rss_first: int = 0
    rss_end: int = 0

    @property
    def served(self) -> int:
        return len(self.latencies)

    @property
    def memory_growth(self) -> float:
        return self.rss_end / self.rss_first if self.rss_first else float("inf")

    @property
    def ok(self) -> bool:
        return not self.failures and self.served > 0 and self.memory_growth <= MAX_MEMORY_GROWTH

    def summary(self) -> str:
        latency = (f"max {max(self.latencies):.2f} s, median {statistics.median(self.latencies):.2f} s"
                   if self.latencies else "none served")
        lines = [
            f"clients: {self.clients}, duration: {self.seconds:.0f} s",
            f"requests served: {self.served} ({self.served / max(self.seconds, 1e-9):.2f}/s), "
            f"failures: {len(self.failures)}",
            f"latency: {latency}",
            f"server memory (RSS): {self.rss_first / 2**20:.0f} MB after the first request, "
            f"{self.rss_end / 2**20:.0f} MB at the end ({self.memory_growth:.2f}x, limit {MAX_MEMORY_GROWTH}x)",
        ]
        lines += [f"failure: {f}" for f in self.failures[:10]]
        return "\n".join(lines)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def serve_model(model: str, port: int) -> None:
    """Load `model` ("tiny", "default" or a folder) and serve the demo on 127.0.0.1:`port` until killed."""
    from mmgen.pipelines import MMGenPipeline

    from .demo import build_demo, serve
    from .testing import tiny_random_pipeline

    if model == "tiny":
        pipe = tiny_random_pipeline()
    else:
        pipe = MMGenPipeline.from_pretrained(None if model == "default" else model)
        pipe.set_progress_bar_config(disable=True)
    serve(build_demo(pipe), host=HOST, port=port)


def start_server(model: str, startup_timeout: float) -> tuple[subprocess.Popen, str]:
    """The demo in a child process, and its URL once it answers."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "mmgen.app.loadtest", "--serve", "--model", model, "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    url = f"http://{HOST}:{port}/"
    deadline = time.monotonic() + startup_timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the demo server exited with code {process.returncode} before it answered")
        try:
            if httpx.get(url, timeout=5).status_code == 200:
                return process, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    process.kill()
    raise TimeoutError(f"the demo server did not answer within {startup_timeout:.0f} s")


def _controls() -> list:
    return [getattr(SETTINGS, name) for name in GenerationSettings.__dataclass_fields__]


def ask(client: Client, text: str, picture: Path | None, timeout: float) -> float:
    """One chat request; returns its latency, or raises saying why it failed."""
    started = time.monotonic()
    job = client.submit({"text": text, "files": [handle_file(str(picture))] if picture else []}, [],
                        *_controls(), api_name="/chat")
    chat, _ = job.result(timeout=timeout)
    notes = [m for m in chat if (m.get("metadata") or {}).get("title") == ERROR_TITLE]
    if notes or chat[-1]["role"] != "assistant":
        raise RuntimeError(f"the answer was an error note: {notes}")
    return time.monotonic() - started


def _client_loop(url: str, index: int, deadline: float, timeout: float, picture: Path, report: LoadReport,
                 lock: threading.Lock) -> None:
    try:
        client = Client(url, verbose=False, download_files=False)
    except Exception as err:  # a client that cannot connect is a failure of the server
        with lock:
            report.failures.append(f"client {index} could not connect: {err}")
        return
    k = index
    while time.monotonic() < deadline:
        text, attached = (STORY, None) if k % 2 == 0 else (QUESTION, picture)
        k += 1
        try:
            latency = ask(client, text, attached, timeout)
        except Exception as err:  # every way a request can fail is counted, and the client goes on
            with lock:
                report.failures.append(f"client {index}: {type(err).__name__}: {err}")
            continue
        with lock:
            report.latencies.append(latency)


def run(clients: int = 16, seconds: float = 60.0, model: str = "tiny", timeout: float = 120.0,
        startup_timeout: float = 600.0) -> LoadReport:
    """Start a server, send it load from `clients` clients for `seconds`, stop it, and report."""
    if clients < 1 or seconds <= 0 or timeout <= 0:
        raise ValueError("clients, seconds and timeout must be positive")
    server, url = start_server(model, startup_timeout)
    report = LoadReport(clients=clients, seconds=seconds)
    lock = threading.Lock()
    try:
        with tempfile.TemporaryDirectory(prefix="mmgen-load-") as folder:
            picture = Path(folder) / "red.png"
            PIL.Image.new("RGB", (16, 16), (200, 30, 30)).save(picture)
            report.latencies.append(ask(Client(url, verbose=False, download_files=False), STORY, None, timeout))
            memory = psutil.Process(server.pid)
            report.rss_first = memory.memory_info().rss
            deadline = time.monotonic() + seconds
            threads = [threading.Thread(target=_client_loop, daemon=True,
                                        args=(url, k, deadline, timeout, picture, report, lock))
                       for k in range(clients)]
            for thread in threads:
                thread.start()
            for thread in threads:  # a request started before the deadline may take up to its timeout
                thread.join(seconds + 2 * timeout)
                if thread.is_alive():
                    report.failures.append("a client was still waiting after its timeout")
            if server.poll() is not None:
                report.failures.append(f"the server died (exit code {server.returncode})")
            else:
                report.rss_end = memory.memory_info().rss
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mmgen.app.loadtest", description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=16, help="concurrent gradio_client clients")
    parser.add_argument("--seconds", type=float, default=60.0, help="how long the clients send requests")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds one request may take")
    parser.add_argument("--model", default="tiny", help="'tiny' (random, fast), 'default', or a model folder")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)  # the server process
    parser.add_argument("--port", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        serve_model(args.model, args.port)
        return 0
    try:
        report = run(args.clients, args.seconds, args.model, args.timeout)
    except (ValueError, RuntimeError, TimeoutError) as err:
        print(f"loadtest: error: {err}", file=sys.stderr)
        return 2
    print(report.summary())
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
