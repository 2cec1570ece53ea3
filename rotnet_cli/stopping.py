"""What Ctrl-C (SIGINT) and a scheduler's SIGTERM do, from the CLI's first line to the interpreter's last.

Every signal handler rotnet installs is installed (and restored) here; the CLI, pretrain, the atomic
writes and the data loader's workers call this module. The states, in the order a command goes
through them (``phase()`` names the current one):

- LOADING: the CLI imports typer, rich and the commands. A signal is counted and raised as a
  KeyboardInterrupt (``interrupt``): cli/__init__.py turns it into one line and exit 130. The count
  survives a library that swallows the KeyboardInterrupt while it imports; main() honours it.
  Installed only over the interpreter's own handler (``while_loading``): an importer keeps its own.
- STARTING: main() until a command's error boundary takes over. Nothing to save or undo: one line
  and exit 130 at once (``stop_at_start``), for SIGTERM too.
- RUNNING: inside a command (``command_started``). Counted KeyboardInterrupts, which the command
  may handle (a staged install rolls back, a probe keeps what it computed, ...).
- TRAINING: pretrain, once its first epoch has started (``StopFlag``). The first signal asks the
  loop to stop at the next step boundary (it checkpoints, then exits 130); a second one, or one
  before training has begun, is a KeyboardInterrupt.
- DEFERRED: while a file is written (``signals_deferred``, around every atomic write): signals are
  held back and delivered, in order, to the handlers of the state around it once the file is complete
  (raised inside torch.save they would surface as a RuntimeError, a traceback, instead of a stop).
- LAST_WORD: the command's last line is printed (``last_word``): Ctrl-C is ignored, so it cannot be cut short.
- FINISHED: the command has said its last word (``command_finished``): a signal only ends the
  process, quietly, exit 130 (a KeyboardInterrupt now would end it by SIGINT, exit -2).
- SHUTTING_DOWN: the interpreter's final teardown (``at_shutdown``, registered with atexit first,
  so it runs last): both signals ignored.
- WORKER: a data-loader worker process (``loader_worker``): Ctrl-C is the main process's business;
  SIGTERM ends the worker at once, as the loader expects when it terminates one.

Standard library only: the CLI imports this before typer, rich and torch.
"""

from __future__ import annotations

import contextlib
import enum
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Phase(enum.Enum):
    LOADING = "loading"
    STARTING = "starting"
    RUNNING = "running"
    TRAINING = "training"
    DEFERRED = "deferred"
    LAST_WORD = "last word"
    FINISHED = "finished"
    SHUTTING_DOWN = "shutting down"
    WORKER = "worker"


_state: dict[str, Any] = {"phase": Phase.LOADING, "seen": 0, "deferring": False, "caught": []}


def phase() -> Phase:
    """The state the process is in (see the module docstring)."""
    return _state["phase"]


def _enter(new: Phase) -> Phase:
    previous, _state["phase"] = _state["phase"], new
    return previous


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _install(handler: Any, signums: tuple[int, ...] = SIGNALS, only_replacing: Any = None) -> dict[int, Any]:
    """Install ``handler`` for ``signums`` (main thread only) -> {signal: the handler it replaced} for
    each it changed; with ``only_replacing``, only where that handler is the installed one."""
    if not _in_main_thread():
        return {}
    replaced = {}
    for signum in signums:
        if only_replacing is not None and signal.getsignal(signum) is not only_replacing:
            continue
        replaced[signum] = signal.signal(signum, handler)
    return replaced


def _restore(replaced: dict[int, Any]) -> None:
    for signum, handler in replaced.items():
        if handler is not None:  # None: a handler not installed from Python, which cannot be put back
            signal.signal(signum, handler)


# ----------------------------------------------------------------------------- LOADING, RUNNING: counted


# Raised while one of these imports, a KeyboardInterrupt can cross torch's C++ (pybind11 calls back into
# Python as torch/__init__ runs) and abort the process: "terminate called after throwing an instance of
# 'pybind11::error_already_set'", exit -6, instead of one line and exit 130.
NATIVE_IMPORTS = ("torch", "torchvision", "timm")


def interrupt(signum: int, frame: Any) -> None:
    """The handler while the CLI loads and while a command runs: counted, then a KeyboardInterrupt
    (sent again once a native import under way has finished, see NATIVE_IMPORTS)."""
    _state["seen"] += 1
    if _native_import_under_way():
        _send_again_after_import(signum)
        return
    raise KeyboardInterrupt


def _native_import_under_way() -> bool:
    """Whether torch (or torchvision, timm) is being imported: importlib marks a module's spec
    ``_initializing`` while its code runs."""
    for name in NATIVE_IMPORTS:
        spec = getattr(sys.modules.get(name), "__spec__", None)
        if spec is not None and getattr(spec, "_initializing", False):
            return True
    return False


def _send_again_after_import(signum: int) -> None:
    """Send ``signum`` to the main thread again once the native import is done (from a watcher thread:
    signal handlers run in the main thread only, between its bytecodes); it then reaches whatever handler
    the process has by then. One watcher at a time; the count stays one per signal."""
    _state["seen"] -= 1  # the handler counts it when it comes again
    if _state.get("watching"):
        return
    _state["watching"] = True
    main = threading.main_thread().ident

    def watch() -> None:
        while _native_import_under_way():
            time.sleep(0.01)
        _state["watching"] = False
        signal.pthread_kill(main, signum)

    threading.Thread(target=watch, name="rotnet-signal-after-import", daemon=True).start()


def ctrl_c_seen() -> bool:
    """Whether Ctrl-C (or SIGTERM) arrived since the count was last reset, even if its KeyboardInterrupt was swallowed."""
    return _state["seen"] > 0


def reset() -> None:
    """A command starts: what happened before it has been dealt with."""
    _state["seen"] = 0


def while_loading() -> None:
    """LOADING: count a Ctrl-C while the CLI imports (over the interpreter's own handler only)."""
    _enter(Phase.LOADING)
    _install(interrupt, (signal.SIGINT,), only_replacing=signal.default_int_handler)


# ----------------------------------------------------------------------------- STARTING


def stop_at_start(signum: int, frame: Any) -> None:
    """Ctrl-C (or SIGTERM) before a command has started: nothing to save or undo, so one line and exit 130 at once."""
    sys.stderr.write("stopped: interrupted before the command started; nothing was changed\n")
    sys.stderr.flush()
    os._exit(130)


def starting() -> None:
    """STARTING (main(), before any command): a signal ends the process with one line; a Ctrl-C that an
    import swallowed while the CLI loaded does so now. Registers the SHUTTING_DOWN handlers with atexit."""
    import atexit

    _enter(Phase.STARTING)
    signal.signal(signal.SIGINT, stop_at_start)
    signal.signal(signal.SIGTERM, stop_at_start)
    if ctrl_c_seen():
        stop_at_start(signal.SIGINT, None)
    atexit.register(at_shutdown)  # first registered, so the last to run


def command_started() -> bool:
    """RUNNING: the error boundary takes the signals over from STARTING -> whether it did (it did not when
    the command runs without main(), e.g. under a test runner or an importer: their handlers stay)."""
    reset()
    owns = bool(_install(interrupt, (signal.SIGINT,), only_replacing=stop_at_start))
    _install(interrupt, (signal.SIGTERM,), only_replacing=stop_at_start)
    if owns:
        _enter(Phase.RUNNING)
    return owns


# ----------------------------------------------------------------------------- LAST_WORD, FINISHED, SHUTTING_DOWN


@contextlib.contextmanager
def last_word() -> Iterator[None]:
    """LAST_WORD for the duration: a Ctrl-C cannot cut the command's last line short."""
    replaced = _install(signal.SIG_IGN, (signal.SIGINT,))
    previous = _enter(Phase.LAST_WORD) if replaced else None
    try:
        yield
    finally:
        _restore(replaced)
        if previous is not None:
            _enter(previous)


def _exit_quietly(signum: int, frame: Any) -> None:
    """Ctrl-C or SIGTERM once the command has printed its last line (the interpreter is shutting down):
    end the process at once, exit 130, with nothing more to say (a KeyboardInterrupt here would end it
    with Python's own exit by SIGINT)."""
    sys.stderr.flush()
    os._exit(130)


def command_finished() -> None:
    """FINISHED: the command has said its last word; a signal now only ends the process, quietly."""
    _enter(Phase.FINISHED)
    _install(_exit_quietly)


def at_shutdown() -> None:
    """SHUTTING_DOWN, the interpreter's last teardown: Ctrl-C and SIGTERM are ignored.

    starting() registers this with atexit before any command runs, so it runs after every other atexit
    callback (they run last-registered first). From there to the end Python has no handler of its own
    and would leave a signal to the default action: the process killed by SIGINT (exit -2) after the
    command had said its last word and chosen its exit code.
    """
    _enter(Phase.SHUTTING_DOWN)
    for signum in SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


# ----------------------------------------------------------------------------- TRAINING: a stop flag


class StopFlag:
    """TRAINING: Ctrl-C (SIGINT) or a scheduler's SIGTERM asks the loop to stop at the next step
    boundary: it checkpoints, then exits 130. A second Ctrl-C stops at once, and so does the
    first one before training has begun (building the model, decoding the data can take
    minutes; there is nothing to save yet, and the run directory goes back as it was).

    Call it (``flag()``) for whether a stop was asked; ``training_started()`` when the first epoch
    starts; ``announce(line)`` says, once, that a stop was asked.
    """

    def __init__(self, announce: Callable[[str], None], training: bool = False) -> None:
        self.requested = False
        self.training = training  # the first epoch has started
        self.announce = announce

    def __call__(self) -> bool:
        return self.requested

    def training_started(self) -> None:
        self.training = True

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested or not self.training:
            raise KeyboardInterrupt
        self.requested = True
        name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        self.announce(f"{name}: saving a checkpoint at the end of this step (Ctrl-C again to abort)")

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        if ctrl_c_seen():  # a Ctrl-C while the command started, whose KeyboardInterrupt library code swallowed
            raise KeyboardInterrupt
        try:
            previous = {sig: signal.signal(sig, self._handle) for sig in SIGNALS}
        except ValueError:  # not the main thread (e.g. some test runners): no handlers
            yield
            return
        before = _enter(Phase.TRAINING)
        try:
            yield
        finally:
            _restore(previous)
            _enter(before)


# ----------------------------------------------------------------------------- DEFERRED


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """DEFERRED: hold back SIGINT and SIGTERM for the duration; deliver them, in order, to the handlers
    that were installed before (a KeyboardInterrupt, the pretrain loop's stop flag, ...) once the block ends.

    Works only in the main thread (where Python runs signal handlers); elsewhere it does nothing.
    """
    if not _in_main_thread() or _state["deferring"]:
        yield  # another thread, or nested: the outer block delivers
        return
    previous = {}
    try:
        for sig in SIGNALS:
            previous[sig] = signal.signal(sig, lambda signum, frame: _state["caught"].append(signum))
    except ValueError:  # not the main interpreter thread after all
        _restore(previous)
        yield
        return
    _state["deferring"] = True
    before = _enter(Phase.DEFERRED)
    try:
        yield
    finally:
        _state["deferring"] = False
        _enter(before)
        _restore(previous)
        caught, _state["caught"] = _state["caught"], []
        for signum in caught:
            _deliver(signum, previous[signum])


def _deliver(signum: int, handler: Any) -> None:
    """Call the handler that a deferred signal would have reached."""
    if callable(handler):
        handler(signum, None)
    elif handler == signal.SIG_DFL:
        signal.raise_signal(signum)  # the default action (SIGTERM: end the process; SIGINT: KeyboardInterrupt)


# ----------------------------------------------------------------------------- WORKER


def loader_worker(worker_id: int) -> None:
    """WORKER (a DataLoader's worker_init_fn): Ctrl-C is the main process's business (it checkpoints);
    workers must not die of it. SIGTERM ends a worker at once, as the loader expects when it terminates
    one: the handler the worker inherited from the CLI would turn it into a KeyboardInterrupt wherever
    the worker happened to be."""
    _enter(Phase.WORKER)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


__all__ = [
    "Phase",
    "phase",
    "interrupt",
    "ctrl_c_seen",
    "reset",
    "while_loading",
    "stop_at_start",
    "starting",
    "command_started",
    "last_word",
    "command_finished",
    "at_shutdown",
    "StopFlag",
    "signals_deferred",
    "loader_worker",
]
