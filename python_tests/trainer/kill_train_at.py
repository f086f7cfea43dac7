"""Test-only runner: ``python kill_train_at.py E:S [instdisc-train flags]`` runs instdisc-train
and SIGKILLs its own process right after step S of epoch E (before the next batch is drawn),
as a crash or a preempted job would, so the tests can resume from what was left on disk.

The kill comes from wrapping the loader that ``train_one_epoch`` iterates; the trainer itself
has no test hook. The repository root goes first on sys.path, so this checkout is tested.
"""
import os
import signal
import sys

_here = os.path.dirname(os.path.abspath(__file__))
ROOT = _here
while not os.path.isfile(os.path.join(ROOT, "instdisc_kernels", "__init__.py")) and os.path.dirname(ROOT) != ROOT:
    ROOT = os.path.dirname(ROOT)
sys.path.insert(0, ROOT)

from instdisc_kernels.train import cli, loop  # noqa: E402


class _KillAfter:
    """Iterates ``loader``; after ``step`` batches were handed out and processed, kills the process."""

    def __init__(self, loader, step):
        self.loader, self.step = loader, step

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        for i, batch in enumerate(self.loader, 1):
            yield batch
            if i == self.step:          # resumed only once the loop finished step i
                os.kill(os.getpid(), getattr(signal, "SIGKILL", signal.SIGTERM))


def main(argv):
    epoch, step = (int(v) for v in argv[0].split(":"))
    one_epoch = loop.train_one_epoch

    def train_one_epoch(model, criterion, optimizer, loader, device, args, ep):
        if ep == epoch:
            loader = _KillAfter(loader, step)
        return one_epoch(model, criterion, optimizer, loader, device, args, ep)

    loop.train_one_epoch = train_one_epoch
    return cli.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
