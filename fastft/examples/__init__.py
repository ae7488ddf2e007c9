"""Scripts to copy: python -m fastft.examples.<name> --help."""
