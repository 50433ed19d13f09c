"""tapio exporters."""
