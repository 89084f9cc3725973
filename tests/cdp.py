"""Headless Chromium driven over the DevTools protocol, on a pipe (stdlib only).

`--dump-dom` after a virtual-time budget dumps whatever is there when the budget runs out: a page
that draws from its server's answers (the MLflow UI) may still show spinners on a busy machine.
Here the test waits for what it means to check (a JS condition, polled), then takes the
screenshot and the DOM. Chromium reads commands on fd 3 and writes answers on fd 4
(`--remote-debugging-pipe`), each a JSON message ended by a NUL byte.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

from test_report import CHROMIUM, FLAGS


class Browser:
    def __init__(self, profile: Path, width: int, height: int) -> None:
        commands, self._to_chrome = os.pipe()
        self._from_chrome, answers = os.pipe()
        devnull = os.open(os.devnull, os.O_WRONLY)
        argv = [str(CHROMIUM), *FLAGS, "--remote-debugging-pipe", f"--user-data-dir={profile}"]
        argv += ["--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"]  # our servers only
        self.pid = os.posix_spawn(
            str(CHROMIUM),
            [*argv, "about:blank"],
            os.environ,
            file_actions=[
                (os.POSIX_SPAWN_DUP2, commands, 3),
                (os.POSIX_SPAWN_DUP2, answers, 4),
                (os.POSIX_SPAWN_DUP2, devnull, 1),
                (os.POSIX_SPAWN_DUP2, devnull, 2),
            ],
            setsid=True,  # its own process group: its helper processes end with it
        )
        for fd in (commands, answers, devnull):
            os.close(fd)
        self._buffer, self._id, self.session = b"", 0, ""
        target = self.send("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.send("Target.attachToTarget", targetId=target, flatten=True)[
            "sessionId"
        ]
        metrics = {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False}
        self.send("Emulation.setDeviceMetricsOverride", **metrics)

    def send(self, method: str, **params: Any) -> dict[str, Any]:
        """One command; its result (events read meanwhile are dropped)."""
        self._id += 1
        message: dict[str, Any] = {"id": self._id, "method": method, "params": params}
        if self.session:
            message["sessionId"] = self.session
        os.write(self._to_chrome, json.dumps(message).encode() + b"\0")
        while True:
            answer = self._read()
            if answer.get("id") == self._id:
                if "error" in answer:
                    raise RuntimeError(f"{method}: {answer['error']}")
                return dict(answer.get("result", {}))

    def _read(self) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            chunk = os.read(self._from_chrome, 1 << 16)
            if not chunk:
                raise RuntimeError("Chromium closed its DevTools pipe")
            self._buffer += chunk
        message, _, self._buffer = self._buffer.partition(b"\0")
        return dict(json.loads(message))

    def evaluate(self, expression: str) -> Any:
        got = self.send("Runtime.evaluate", expression=expression, returnByValue=True)
        return got.get("result", {}).get("value")

    def open(self, url: str, ready: str, timeout_s: float = 90.0) -> bool:
        """Load `url`; poll the JS expression `ready` every 0.25 s until it is true (False when
        `timeout_s` passes first: the caller's checks then say what is missing)."""
        self.send("Page.navigate", url=url)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.evaluate(ready) is True:
                return True
            time.sleep(0.25)
        return False

    def screenshot(self, path: Path) -> bytes:
        data = base64.b64decode(self.send("Page.captureScreenshot", format="png")["data"])
        path.write_bytes(data)
        return data

    def dom(self) -> str:
        return str(self.evaluate("document.documentElement.outerHTML"))

    def close(self) -> None:
        self.session = ""  # a browser-level command
        try:
            self.send("Browser.close")
        except (OSError, RuntimeError):
            pass
        finally:
            for fd in (self._to_chrome, self._from_chrome):
                os.close(fd)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGKILL)  # whatever is left of the group
            os.waitpid(self.pid, 0)
