"""Progress on stderr that reads well in a terminal and in a log file: the one printer of the package.

    with Progress(total=len(images), desc="top-9 features.29", unit="image", rate=True) as bar:
        for batch in batches:
            ...
            bar.update(len(batch))
    for amount in track(amounts, desc="invariance rotate", unit="amount", enabled=progress):
        ...

In a terminal (stderr is a tty) it is a tqdm bar; in a file or a CI log, a plain line at each tenth
of the work (every tenth update where the total is unknown), never a carriage return or a cursor
movement. ``say`` prints a message above the bar. Disabled (``enabled=False``), it prints nothing.
"""
from __future__ import annotations

import sys
import time
from typing import Iterable, Iterator, Optional, TypeVar

__all__ = ["Progress", "track", "is_terminal", "duration"]

T = TypeVar("T")


def is_terminal(stream=None) -> bool:
    """Whether ``stream`` (default stderr) is a terminal."""
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def duration(seconds: float) -> str:
    """Seconds in words: "42 s", "3 min 05 s", "2 h 07 min"."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


class Progress:
    """One progress display on stderr.

    total: the work (None where unknown). initial: work already done before (a resumed scan); the
    rate and the time left count only what is done from here. unit: what is counted, in the
    singular. rate: the lines also give units per second. enabled: False shows nothing.
    """

    def __init__(self, total: Optional[int], desc: str, unit: str, *, enabled: bool = True, initial: int = 0,
                 rate: bool = False):
        self.total, self.desc, self.unit, self.rate = total, desc, unit, rate
        self.enabled = enabled and total != 0
        self.done = self.initial = initial
        self.started = time.perf_counter()
        self.terminal = is_terminal()
        self.bar = None
        self.next_share, self.updates = 0.1, 0

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> bool:
        self.close()
        return False

    def say(self, message: str) -> None:
        """A line above the bar (or in the log)."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(message, file=sys.stderr)
        else:
            print(message, file=sys.stderr, flush=True)

    def update(self, count: int, left: Optional[float] = None) -> None:
        """``count`` more done; ``left``: the seconds still to go, where the caller knows better than
        the average so far."""
        self.done += count
        self.updates += 1
        if not self.enabled:
            return
        if self.terminal:
            self._update_bar(count, left)
        elif self._line_due():
            self._print_line(left)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    # -- a terminal: tqdm --------------------------------------------------------------------- #

    def _update_bar(self, count: int, left: Optional[float]) -> None:
        if self.bar is None:  # opened at the first update, below what was said before it
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, initial=self.initial, desc=self.desc, unit=self.unit, file=sys.stderr,
                            dynamic_ncols=True)
        if left is not None and self.total is not None and self.done < self.total:
            self.bar.set_postfix_str(f"about {duration(left)} left", refresh=False)
        self.bar.update(count)

    # -- a log file: a line at each tenth ----------------------------------------------------- #

    def _line_due(self) -> bool:
        if not self.total:
            return self.updates % 10 == 1
        if self.done < self.next_share * self.total and self.done < self.total:
            return False
        while self.next_share * self.total <= self.done:
            self.next_share += 0.1
        return True

    def _print_line(self, left: Optional[float]) -> None:
        elapsed = time.perf_counter() - self.started
        new = self.done - self.initial
        of = f"/{self.total}" if self.total else ""
        parts = [f"{self.desc}: {self.done}{of} {self.unit}s"]
        if self.rate:
            parts.append(f"{new / max(elapsed, 1e-9):.1f} {self.unit}/s")
        parts.append(f"{duration(elapsed)} so far")
        if self.total and self.done < self.total:
            if left is None and new > 0:
                left = elapsed / new * (self.total - self.done)
            if left is not None:
                parts.append(f"about {duration(left)} left")
        print(", ".join(parts), file=sys.stderr, flush=True)


def track(items: Iterable[T], *, desc: str, unit: str, enabled: bool = True, total: Optional[int] = None) -> Iterator[T]:
    """``items`` one by one, with a :class:`Progress` of them (total: ``len(items)`` where it has one)."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)
    with Progress(total, desc, unit, enabled=enabled) as bar:
        for item in items:
            yield item
            bar.update(1)
