"""Helpers shared by the benchmark scripts (run as ``python benchmarks/<script>.py``, so the
scripts import this module as ``common``, from their own folder)."""

from __future__ import annotations

import json
import subprocess


class JsonLineWorker:
    """A subprocess that answers each request line on its stdin with one JSON line on stdout.

    `info` is the first JSON line it prints (its versions and settings); other output lines
    (e.g. library warnings) are skipped. `name` names the worker in errors.
    """

    def __init__(self, argv: list[str], env: dict[str, str], name: str):
        self.name = name
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.info = self.read()

    def read(self) -> dict:
        """The worker's next JSON line."""
        while True:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"{self.name} worker exited with code {self.proc.wait()}")
            if line.startswith("{"):
                return json.loads(line)

    def request(self, line: str) -> dict:
        """Send one request line and return the worker's JSON answer."""
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        return self.read()

    def close(self, timeout: float | None = None) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=timeout)
