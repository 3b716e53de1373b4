"""Live progress on stderr: a tqdm bar on a terminal, periodic one-line reports otherwise (logs, CI)."""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO


class Progress:
    """``update(n, **fields)`` sets the absolute position and the fields shown next to it."""

    def __init__(
        self,
        *,
        desc: str,
        total: float | None,
        unit: str,
        enabled: bool = True,
        interval_s: float = 5.0,
        stream: TextIO | None = None,
    ) -> None:
        self.desc = desc
        self.total = total
        self.unit = unit
        self.enabled = enabled
        self.interval_s = interval_s
        self.stream = stream if stream is not None else sys.stderr
        self._bar: Any = None
        self._last_line = 0.0
        self._n = 0.0
        self._fields: dict[str, Any] = {}
        if enabled and self.stream.isatty():
            from tqdm import tqdm

            self._bar = tqdm(
                desc=desc,
                total=total,
                unit=unit,
                file=self.stream,
                dynamic_ncols=True,
                mininterval=0.25,
                bar_format=None if total is not None else "{desc}: {n_fmt} {unit} [{elapsed}{postfix}]",
            )

    def update(self, n: float, **fields: Any) -> None:
        self._n = n
        self._fields = fields
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.n = n
            self._bar.set_postfix(fields, refresh=False)
            self._bar.refresh()
            return
        now = time.monotonic()
        if now - self._last_line >= self.interval_s:
            self._last_line = now
            self._line()

    def write(self, text: str) -> None:
        """A message (shown even when the bar is disabled) that does not break the bar."""
        if self._bar is not None:
            self._bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def _line(self) -> None:
        total = f"/{self.total:g}" if self.total is not None else ""
        extra = " ".join(f"{k}={v}" for k, v in self._fields.items())
        print(f"{self.desc}: {self._n:g}{total} {self.unit} {extra}".rstrip(), file=self.stream, flush=True)

    def close(self) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        else:
            self._line()
