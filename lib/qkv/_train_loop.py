"""qkv.train's loop helpers that have nothing to do with the model: Ctrl-C and the bar."""

import signal
import sys
import threading


class _StopOnCtrlC:
    """First Ctrl-C: finish the step in flight, then stop (the loop saves a checkpoint, so
    --resume continues exactly). A second Ctrl-C stops at once."""

    def __enter__(self):
        self.requested, self.previous = False, None
        if threading.current_thread() is threading.main_thread():  # signals live there only
            self.previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def _handler(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nCtrl-C: stopping after this step (again to stop now)", file=sys.stderr)

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


def _progress_bar(enabled: bool, initial: int, total: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit="step", disable=not enabled,
                dynamic_ncols=True, mininterval=0.5)
