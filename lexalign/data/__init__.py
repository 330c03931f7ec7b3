"""Reading, checking and splitting datasets."""
