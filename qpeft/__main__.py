"""``python -m qpeft`` and the ``qpeft`` script: the process settings that must be made
before torch is imported, then the CLI.

``THP_MEM_ALLOC_ENABLE=1`` (unless the environment sets it): torch's CPU allocator then gives
each tensor of 2 MB or more a 2 MB-aligned block advised for transparent huge pages. Read once,
at torch's first allocation, so only a launcher can set it. Measured on the embedded model's
training step (docs/benchmarks.md): −0.16 GB of peak RSS at the same speed. Linux only; set
it to 0 to turn it off.
"""
import os


def main() -> None:
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    from qpeft.core.cli.main import main as cli_main

    cli_main()


if __name__ == "__main__":
    main()
