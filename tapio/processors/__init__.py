"""tapio processors."""
