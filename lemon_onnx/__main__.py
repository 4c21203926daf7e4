"""``python -m lemon_onnx`` and the ``lemon-onnx`` console script.

The signal handlers go in before anything heavy is imported (click, numpy, onnx, ONNX
Runtime), so a Ctrl-C that comes during those imports already exits 130."""

import sys


def main() -> None:
    from lemon_onnx import signals

    signals.install()
    try:
        from lemon_onnx.cli import main as cli_main

        cli_main()  # exits with the contract's code
    except SystemExit:
        raise
    except BaseException:  # a signal before the command line's own handling began
        if signals.received() is None:
            raise
        signals.finish()
        print("lemon-onnx: error: interrupted; nothing was written.", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
