"""tapio cmd."""
