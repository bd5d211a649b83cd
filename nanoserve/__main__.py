"""``python -m nanoserve serve | generate | run``: see nanoserve/cli.py."""

from nanoserve.cli import main

if __name__ == "__main__":
    main()
