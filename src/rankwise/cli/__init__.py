"""The `rankwise` command: each subcommand parses options and calls one library verb."""


def main() -> None:
    from .main import main as _main

    _main()
