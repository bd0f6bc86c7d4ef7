"""`python -m bench`: the `bench` command line (bench/app/cli.py; docs/cli.md)."""

from bench.app.cli import main

if __name__ == "__main__":
    main()
