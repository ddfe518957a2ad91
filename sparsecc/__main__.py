"""``python -m sparsecc ...``: the same command line as the ``sparsecc`` script (:mod:`sparsecc.cli`)."""

from sparsecc.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
