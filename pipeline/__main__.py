"""``python -m pipeline``: the same command line as ``labelcat``."""

from pipeline.cli import main

if __name__ == "__main__":
    main()
