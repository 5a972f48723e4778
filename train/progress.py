"""Progress of long work (training epochs, eval, importance weighting, sampling, export).

``Progress(title, total, unit)`` counts work done towards a known total and shows the count,
the rate and the time left (ETA):

* on a terminal (the stream is a tty), one line redrawn in place at most every
  ``redraw_seconds``:  ``eval  [#########...........]  200/500 images  12.1 images/s  ETA 0:25``;
* anywhere else (a log file, a pipe, CI), a plain line at most every ``log_seconds`` and one
  when the work ends, so a log holds a few lines, not thousands of redraws.

The rate leaves out the first update (tracing and compiling happen there), so the ETA is the
steady-state one; until a second update there is no rate and the ETA reads '?'. Lines go to stderr, beside the log; results (``say``) go to stdout.
"""

import logging as std_logging
import sys
import time

from absl import logging

BAR_WIDTH = 24


def is_terminal(stream):
  try:
    return stream.isatty()
  except (AttributeError, ValueError):
    return False


def format_seconds(seconds):
  """'42s', '3:07', '1:02:03'."""
  seconds = max(0, int(round(seconds)))
  if seconds < 60:
    return f'{seconds}s'
  minutes, seconds = divmod(seconds, 60)
  if minutes < 60:
    return f'{minutes}:{seconds:02d}'
  hours, minutes = divmod(minutes, 60)
  return f'{hours}:{minutes:02d}:{seconds:02d}'


class _ClearBar(std_logging.Filter):
  """Ends the bar's line before a log record is written under it (the bar redraws after)."""

  def __init__(self, stream):
    super().__init__()
    self.stream = stream
    self.drawn = False

  def filter(self, record):
    if self.drawn:
      self.stream.write('\n')
      self.stream.flush()
      self.drawn = False
    return True


class Progress:
  """Work done towards a known total, drawn as a bar on a terminal, logged sparsely otherwise.

  Args:
    title: what is being done ('eval', 'epoch 3/8', ...).
    total: units of work in all (> 0).
    unit: name of the unit ('images', 'steps', ...).
    show: False draws and logs nothing (--verbose=0).
    bar: None: a bar when the stream is a terminal; False: log lines only (--verbose=2).
    stream: where the bar goes (default sys.stderr); log lines go through absl logging.
    redraw_seconds / log_seconds: minimal time between two redraws / two log lines.
    final_line: log a last line when the work ends (off a terminal).
    rate_unit / rate_per_unit: show the rate in another unit (training counts steps and shows
      images/s with rate_per_unit = the batch size).
    clock: a monotonic clock in seconds (tests pass a fake one).
  """

  def __init__(self, title, total, unit='images', *, show=True, bar=None, stream=None,
               redraw_seconds=0.5, log_seconds=60., final_line=True, rate_unit=None,
               rate_per_unit=1, clock=time.monotonic):
    if total <= 0:
      raise ValueError(f'Progress needs a total > 0, got {total}')
    self.title, self.total, self.unit = title, int(total), unit
    self.show = show
    self.stream = stream or sys.stderr
    self.bar = is_terminal(self.stream) if bar is None else bool(bar and is_terminal(self.stream))
    self.redraw_seconds, self.log_seconds = redraw_seconds, log_seconds
    self.final_line = final_line
    self.rate_unit, self.rate_per_unit = rate_unit or unit, rate_per_unit
    self.closed = False
    self.clock = clock
    self.done = 0
    self.fields = {}
    self.started = clock()
    self._first = None  # (time, done) after the first update: the rate's origin
    self._finished = None  # when done reached total
    self._last_draw = self._last_log = self.started
    self._clear = None
    self._width = 0
    self.lines_logged = 0
    if self.show and self.bar:
      self._clear = _ClearBar(self.stream)
      logging.get_absl_handler().addFilter(self._clear)

  # ---------------------------------------------------------------------------- figures
  def _now(self):
    return self._finished if self._finished is not None else self.clock()

  def rate(self):
    """Units a second since the first update (0 until a second update: the first one includes
    tracing and compiling), up to the moment the total was reached."""
    now = self._now()
    if self._first is not None and self.done > self._first[1] and now > self._first[0]:
      return (self.done - self._first[1]) / (now - self._first[0])
    return 0.

  def eta(self):
    """Seconds left at the current rate (None before a rate is known)."""
    rate = self.rate()
    return (self.total - self.done) / rate if rate > 0 else None

  def line(self):
    """The status line: title, bar (on a terminal), count, rate, fields, ETA or elapsed."""
    parts = [self.title]
    if self.bar:
      filled = int(BAR_WIDTH * min(self.done, self.total) / self.total)
      parts.append('[' + '#' * filled + '.' * (BAR_WIDTH - filled) + ']')
    parts.append(f'{self.done}/{self.total} {self.unit}')
    rate = self.rate() * self.rate_per_unit
    if rate > 0:
      parts.append(f'{rate:.0f} {self.rate_unit}/s' if rate >= 100 else
                   f'{rate:.3g} {self.rate_unit}/s')
    parts.extend(f'{name} {value}' for name, value in self.fields.items())
    if self.done >= self.total:
      parts.append(f'in {format_seconds(self._now() - self.started)}')
    else:
      eta = self.eta()
      parts.append('ETA ' + (format_seconds(eta) if eta is not None else '?'))
    return '  '.join(parts)

  # ---------------------------------------------------------------------------- updates
  def update(self, amount=1, **fields):
    """Adds `amount` units done; `fields` (name=value, already formatted or numbers) are shown
    after the rate until replaced."""
    self.done += int(amount)
    for name, value in fields.items():
      self.fields[name] = f'{value:.4g}' if isinstance(value, float) else value
    now = self.clock()
    if self._first is None:
      self._first = (now, self.done)
    if self.done >= self.total and self._finished is None:
      self._finished = now  # the final line keeps the rate and time of this moment
    if not self.show:
      return
    if self.bar:
      if now - self._last_draw >= self.redraw_seconds or self.done >= self.total:
        self._draw()
        self._last_draw = now
    elif now - self._last_log >= self.log_seconds and self.done < self.total:
      self._log()
      self._last_log = now

  def close(self):
    """Ends the bar's line (terminal) or logs the final line (elsewhere)."""
    if not self.show or self.closed:
      return
    self.closed = True
    if self.bar:
      self._draw()
      self.stream.write('\n')
      self.stream.flush()
      logging.get_absl_handler().removeFilter(self._clear)
    elif self.done and self.final_line:
      self._log()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  def _draw(self):
    text = self.line()
    self.stream.write('\r' + text.ljust(self._width))  # spaces cover a longer previous line
    self._width = len(text)
    self.stream.flush()
    self._clear.drawn = True

  def _log(self):
    logging.info('%s', self.line())
    self.lines_logged += 1
