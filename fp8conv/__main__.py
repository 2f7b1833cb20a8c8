"""`python -m fp8conv`: the same command as `fp8conv`."""

from fp8conv.cli import main

if __name__ == "__main__":
    main()
