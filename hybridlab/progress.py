"""A one-line progress bar on stderr: step, loss, tokens/s, ETA (no dependency)."""
from __future__ import annotations

import sys
import time


def fmt_time(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class Progress:
    def __init__(self, total: int, start: int = 0, stream=sys.stderr):
        self.total, self.start, self.stream = total, start, stream
        self.t0 = time.perf_counter()
        self.tty = stream.isatty()
        self._last_print = 0.0

    def update(self, step: int, loss: float, tokens_per_s: float, extra: str = "", force: bool = False) -> None:
        now = time.perf_counter()
        done = step - self.start
        eta = (now - self.t0) / done * (self.total - step) if done > 0 else 0.0
        line = (f"step {step}/{self.total} | loss {loss:.4f} | {tokens_per_s / 1e3:.1f}K tok/s | "
                f"ETA {fmt_time(eta)}" + (f" | {extra}" if extra else ""))
        if self.tty:
            self.stream.write("\r" + line.ljust(100))
            self.stream.flush()
        elif force or now - self._last_print > 10 or step == self.total:
            self.stream.write(line + "\n")
            self.stream.flush()
            self._last_print = now

    def clear(self) -> None:
        """Blank the bar's line on a terminal, so a message printed next starts clean (the next
        update draws the bar again)."""
        if self.tty:
            self.stream.write("\r" + " " * 100 + "\r")
            self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()
