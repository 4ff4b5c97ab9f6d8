"""One-off studies: each answers one question about this toolkit on the embedded pair; the index is in README.md."""
