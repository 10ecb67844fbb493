"""What the scripts in scripts/ run: argument handling around the library (the top layer)."""
