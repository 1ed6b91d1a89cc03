"""`evoforge tasks` and `evoforge eval`."""
