"""`evoforge seeds`, `evoforge merge`, `evoforge validate`."""
