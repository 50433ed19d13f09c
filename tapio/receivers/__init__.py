"""tapio receivers."""
