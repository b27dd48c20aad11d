"""A sweep around its launcher: prepare (check, skip, size), launch with hints, follow, finish (parent runs)."""
