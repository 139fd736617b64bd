"""``python -m harness.data verify DIR``: list the image files under DIR that cannot be decoded."""

from harness.data.files import main

if __name__ == "__main__":
    raise SystemExit(main())
